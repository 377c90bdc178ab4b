"""The VAP pipeline beyond the golden single-reference case: several references, frame selection, no
CFG, seeding, latents' dtype, the recorder."""
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from configs import cog_vap_tiny
from vapjax import video
from vapjax.models import cogvideox, cogvideox_vae, t5
from vapjax.pipelines.cogvideox_vap import CogVideoXVAP, Request


@pytest.fixture(scope="module")
def pipe():
    m = cog_vap_tiny.get_config().model
    return CogVideoXVAP.random(cogvideox.CogVideoXConfig(**m.transformer.to_dict()),
                               cogvideox_vae.VAEConfig(**m.vae.to_dict()), t5.T5Config(**m.text_encoder.to_dict()),
                               m.tokenizer, m.scheduler.to_dict(), seed=0)


@pytest.fixture(scope="module")
def inputs():
    c = cog_vap_tiny.get_config()
    ref, _ = video.read_video(c.ref_video)
    return video.read_image(c.image), ref


def request(**kw):
    base = dict(prompt="a ball floats up", ref_prompts=("a ball rises",), height=64, width=96, num_frames=9,
                steps=2, max_sequence_length=32, posterior="mode")
    return Request(**{**base, **kw})


def run(pipe, *args, **kw):
    """The pipeline's output and everything it recorded."""
    recorded = {}
    return pipe(*args, recorder=recorded.__setitem__, **kw), recorded


def test_two_references_order_and_layout(pipe, inputs):
    """N references: latents concatenated on frames in the given order (the last one next to the target
    in RoPE time); swapping them changes the result; the uncond half keeps the reference video."""
    image, ref = inputs
    other = ref[::-1].copy()
    req = request(ref_prompts=("a ball rises", "a white ball swells"))
    a, ta = run(pipe, image, [ref, other], req)
    b, tb = run(pipe, image, [other, ref], req)
    lf = 3
    ref_in = ta["transformer_in.hidden_states_mot_ref"]
    assert ref_in.shape == (2, 2 * lf, 8, 12, 32)                     # [uncond, cond] x (N·f frames)
    np.testing.assert_array_equal(ref_in[0], ref_in[1])              # same reference in both CFG halves
    np.testing.assert_array_equal(ref_in[1, :lf, ..., :16], ta["vae_encode.ref_video.0"][0] * np.float32(0.7))
    np.testing.assert_array_equal(tb["transformer_in.hidden_states_mot_ref"][1, :lf],
                                  ref_in[1, lf:])                    # swapped order, swapped blocks
    assert np.abs(a.frames - b.frames).max() > 1e-4
    # The uncond half's reference captions are the negative prompt, once per reference.
    rt = ta["transformer_in.encoder_hidden_states_mot_ref"]
    assert rt.shape == (2, 2 * 32, rt.shape[-1])
    np.testing.assert_array_equal(rt[0, :32], rt[0, 32:])


def test_evenly_picks_over_the_first_reference_length(pipe, inputs):
    """Official (CPIPE:894-906): every reference takes floor(linspace(0, L0 − 1, n)) of the FIRST
    reference's length L0; frames_per_reference_length=True spaces each over its own length."""
    image, ref = inputs                                              # 13 frames
    longer = np.concatenate([ref[::-1], ref[:7]])                    # 20 frames
    req = request(ref_prompts=("a ball rises", "a white ball swells"))
    _, official = run(pipe, image, [ref, longer], req)
    np.testing.assert_array_equal(official["reference_frames.1"], [0, 1, 3, 4, 6, 7, 9, 10, 12])
    np.testing.assert_array_equal(official["reference_frames.0"], official["reference_frames.1"])
    want = pipe.encoders.posterior(longer[[0, 1, 3, 4, 6, 7, 9, 10, 12]][None]).mean
    np.testing.assert_array_equal(official["vae_encode.ref_video.1"], want)
    _, own = run(pipe, image, [ref, longer], Request(**{**req.__dict__, "frames_per_reference_length": True}))
    np.testing.assert_array_equal(own["reference_frames.1"], video.select_frames(20, 9))
    assert own["reference_frames.1"][-1] == 19
    # A second reference too short for the first's span is a one-line error naming it.
    with pytest.raises(ValueError, match="reference video 1 has 8 frames.*first reference's 13"):
        pipe(image, [ref, ref[:8]], req)


def test_short_reference_repeats_frames_with_a_note(pipe, inputs, caplog):
    """"evenly" with fewer reference frames than num_frames repeats frames (official) and says so once;
    "first" and "random" need enough frames."""
    image, ref = inputs
    with caplog.at_level(logging.WARNING, logger="vapjax.video"):
        _, rec = run(pipe, image, [ref[:5]], request())
    np.testing.assert_array_equal(rec["reference_frames.0"], [0, 0, 1, 1, 2, 2, 3, 3, 4])
    notes = [r.getMessage() for r in caplog.records if "repeats frames" in r.getMessage()]
    assert notes == ["reference video 0 has 5 frames, fewer than 9: 'evenly' repeats frames"]
    for mode in ("first", "random"):
        with pytest.raises(ValueError, match=f"5 frames; frames_selection='{mode}' needs 9"):
            pipe(image, [ref[:5]], request(frames_selection=mode))


def test_bf16_latents_are_cast_to_the_compute_dtype(pipe, inputs):
    """Given latents in another dtype join the compute dtype before the first step and stay there
    (CPIPE:1057): bf16 noise into the float32 pipeline == the same values given in float32."""
    image, ref = inputs
    noise = np.random.default_rng(0).standard_normal((1, 3, 8, 12, 16)).astype(np.float32)
    bf16 = jnp.asarray(noise, jnp.bfloat16)
    a, rec = run(pipe, image, [ref], request(), latents=bf16)
    b = pipe(image, [ref], request(), latents=np.asarray(bf16.astype(jnp.float32)))
    assert a.latents.dtype == np.float32 and rec["latents_init"].dtype == np.float32
    assert rec["steps.latents"].dtype == np.float32
    np.testing.assert_array_equal(a.latents, b.latents)


def test_no_cfg_and_seed(pipe, inputs):
    image, ref = inputs
    one, rec = run(pipe, image, [ref], request(guidance_scale=1.0, posterior="sample", seed=3))
    assert rec["steps.noise_pred"].shape[1] == 1                     # a single (conditional) branch
    again = pipe(image, [ref], request(guidance_scale=1.0, posterior="sample", seed=3))
    np.testing.assert_array_equal(one.frames, again.frames)
    other = pipe(image, [ref], request(guidance_scale=1.0, posterior="sample", seed=4))
    assert np.abs(other.frames - one.frames).max() > 1e-4


def test_too_many_references(pipe, inputs):
    image, ref = inputs
    with pytest.raises(ValueError, match="1 to 3"):
        pipe(image, [ref] * 4, request(ref_prompts=("x",) * 4))
    with pytest.raises(ValueError, match="2 reference videos but 1 reference prompts"):
        pipe(image, [ref] * 2, request())
