"""The VAP pipeline beyond the golden single-reference case: several references, no CFG, seeding."""
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


def test_two_references_order_and_layout(pipe, inputs):
    """N references: latents concatenated on frames in the given order (the last one next to the target
    in RoPE time); swapping them changes the result; the uncond half keeps the reference video."""
    image, ref = inputs
    other = ref[::-1].copy()
    req = request(ref_prompts=("a ball rises", "a white ball swells"))
    a = pipe(image, [ref, other], req, record=True)
    b = pipe(image, [other, ref], req, record=True)
    lf = 3
    ref_in = a.trace["transformer_in.hidden_states_mot_ref"]
    assert ref_in.shape == (2, 2 * lf, 8, 12, 32)                     # [uncond, cond] x (N·f frames)
    np.testing.assert_array_equal(ref_in[0], ref_in[1])              # same reference in both CFG halves
    np.testing.assert_array_equal(ref_in[1, :lf, ..., :16], a.trace["vae_encode.ref_video.0"][0] * np.float32(0.7))
    np.testing.assert_array_equal(b.trace["transformer_in.hidden_states_mot_ref"][1, :lf],
                                  ref_in[1, lf:])                    # swapped order, swapped blocks
    assert np.abs(a.frames - b.frames).max() > 1e-4
    # The uncond half's reference captions are the negative prompt, once per reference.
    rt = a.trace["transformer_in.encoder_hidden_states_mot_ref"]
    assert rt.shape == (2, 2 * 32, rt.shape[-1])
    np.testing.assert_array_equal(rt[0, :32], rt[0, 32:])


def test_no_cfg_and_seed(pipe, inputs):
    image, ref = inputs
    one = pipe(image, [ref], request(guidance_scale=1.0, posterior="sample", seed=3), record=True)
    assert one.trace["steps.noise_pred"].shape[1] == 1                # a single (conditional) branch
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
