"""Parity with the official Video-As-Prompt implementation on its recorded tiny-model runs.

Every case folder under $VAPJAX_GOLDEN_DIR (default ../shared/golden) is discovered, not listed.
Transformer cases: convert the official checkpoint with our converter, run our forward on the
recorded inputs, compare with the recorded output. Tolerance: fp32 relative error ≤ 1e-5.
Pipeline cases: convert the whole pipeline folder, run our pipeline with the call recorded in
case.json, compare every recorded tensor: integers, timesteps and guidance scales exactly, float
tensors to fp32 relative error ≤ 1e-5 (measured ≤ 2e-6).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import golden_cases, golden_dir, rel_err
from convert.cogvideox import convert_transformer
from vapjax.models import cogvideox

CASES = golden_cases()


def test_golden_cases_found():
    assert CASES, f"no golden case folders under {golden_dir()} (set VAPJAX_GOLDEN_DIR)"


def _kind(case):
    meta = json.loads((case / "case.json").read_text())
    return "model" if "model" in meta else "pipeline" if "pipeline" in meta else "unknown", meta


def channels_last(x):
    """Official [B, F, C, H, W] -> our [B, F, H, W, C]."""
    return jnp.asarray(x).transpose(0, 1, 3, 4, 2)


def run_transformer_case(case, dtype=jnp.float32, **options):
    """Convert the case's checkpoint, run our forward in `dtype` (weights and compute) with run `options`."""
    meta = json.loads((case / "case.json").read_text())
    cfg, params = convert_transformer(str(case), dtype=dtype)
    name = jnp.dtype(dtype).name
    cfg = cfg.with_options(dtype=name, param_dtype=name, **options)
    inp = load_file(case / "inputs.safetensors")
    x = lambda a: jnp.asarray(a, dtype)
    out = cogvideox.CogVideoXTransformer(cfg).apply(
        {"params": params}, x(channels_last(inp["hidden_states"])), x(inp["encoder_hidden_states"]),
        inp["timestep"], x(channels_last(inp["hidden_states_mot_ref"])), x(inp["encoder_hidden_states_mot_ref"]))
    assert out.dtype == dtype
    want = np.asarray(channels_last(load_file(case / "expected.safetensors")["sample"]))
    return cfg, meta, inp, np.asarray(out, np.float32), want


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case, tmp_path):
    kind, meta = _kind(case)
    if kind == "pipeline":
        return check_pipeline_case(case, meta, tmp_path)
    assert meta["model"] == "CogVideoXTransformer3DMOTModel", f"unknown golden model {meta['model']}"
    cfg, meta, inp, out, want = run_transformer_case(case)
    err = rel_err(out, want)
    print(f"{case.name}: fp32 relative error {err:.2e}")
    assert err <= 1e-5

    # Our RoPE (computed inside the model) against the tables the official pipeline passed in.
    f, gh, gw = inp["hidden_states"].shape[1], inp["hidden_states"].shape[3] // 2, inp["hidden_states"].shape[4] // 2
    n = meta["num_mot_ref"]
    for suffix, refs in (("", 0), ("_mot_ref", n)):
        cos, sin = cogvideox.rope_tables(*cogvideox.rope_positions(cfg, f, gh, gw, num_refs=refs), cfg.head_dim)
        np.testing.assert_allclose(cos, inp[f"rope_cos{suffix}"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(sin, inp[f"rope_sin{suffix}"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if _kind(c)[0] == "model"],
                         ids=[c.name for c in CASES if _kind(c)[0] == "model"])
def test_golden_bf16(case):
    """bf16 weights and compute (fp32 norm statistics, RoPE, timestep features) stay within 2e-2."""
    *_, out, want = run_transformer_case(case, dtype=jnp.bfloat16)
    err = rel_err(out, want)
    print(f"{case.name}: bf16 relative error {err:.2e}")
    assert err <= 2e-2


# Golden layout of each traced tensor (ours is channels-last everywhere).
_LAYOUTS = {"BFCHW": (0, 1, 3, 4, 2), "BCFHW": (0, 2, 3, 4, 1), "SBFCHW": (0, 1, 2, 4, 5, 3)}


def _golden_layout(name, shape):
    if name.startswith(("vae_encode_mode.", "vae_decode_")):
        return "BCFHW"
    if name.startswith("steps.") and len(shape) == 6:
        return "SBFCHW"
    if len(shape) == 5 and name != "frames":
        return "BFCHW"
    return None


def check_pipeline_case(case, meta, tmp_path):
    from convert.pipeline import convert_pipeline  # noqa: PLC0415
    from vapjax.pipelines.cogvideox_vap import CogVideoXVAP, DEFAULT_NEGATIVE_PROMPT, Request  # noqa: PLC0415

    assert meta["pipeline"] == "CogVideoXImageToVideoMOTPipeline", f"unknown golden pipeline {meta['pipeline']}"
    call = meta["call"]
    assert call["frames_selection"] == "evenly" and call["num_videos_per_prompt"] == 1
    assert any("latent_dist.mode()" in m for m in meta.get("monkeypatches", [])), "case must use the VAE mode"
    convert_pipeline(str(case), str(tmp_path / "pipe"))
    pipe = CogVideoXVAP.load(str(tmp_path / "pipe"))
    # A prompt the call did not pass is the official default (case.json:defaults), which must be ours too.
    neg, neg_ref = (call[k] if not str(call[k]).startswith("NOT PASSED") else meta["defaults"][k]
                    for k in ("negative_prompt", "negative_prompt_mot_ref"))
    for k in ("negative_prompt", "negative_prompt_mot_ref"):
        if str(call[k]).startswith("NOT PASSED"):
            assert meta["defaults"][k] == DEFAULT_NEGATIVE_PROMPT, f"our default {k} differs from the official one"
    req = Request(prompt=call["prompt"], ref_prompts=tuple(call["prompt_mot_ref"]), negative_prompt=neg,
                  negative_ref_prompt=neg_ref, height=call["height"], width=call["width"],
                  num_frames=call["num_frames"], steps=call["num_inference_steps"],
                  guidance_scale=call["guidance_scale"], dynamic_cfg=call["use_dynamic_cfg"],
                  max_sequence_length=call["max_sequence_length"], frames_selection=call["frames_selection"],
                  posterior="mode")
    inp = load_file(case / "inputs.safetensors")
    out = pipe(inp["image"], list(inp["ref_videos"]), req,
               latents=np.asarray(channels_last(inp["latents"])), record=True)
    trace = load_file(case / "trace.safetensors")

    # Names in the golden trace that are ours under another name; N = 1 reference here.
    ours = {**out.trace, **{k.replace("vae_encode.", "vae_encode_mode.").removesuffix(".0"): v
                            for k, v in out.trace.items() if k.startswith("vae_encode.")}}
    tables = {"rope", "rope_mot_ref"}
    f, gh, gw = out.latents.shape[1], out.latents.shape[2] // 2, out.latents.shape[3] // 2
    for name, refs in (("rope", 0), ("rope_mot_ref", len(req.ref_prompts))):
        cos, sin = cogvideox.rope_tables(*cogvideox.rope_positions(pipe.transformer.config, f, gh, gw, refs),
                                         pipe.transformer.config.head_dim)
        ours[f"{name}.cos"], ours[f"{name}.sin"] = np.asarray(cos), np.asarray(sin)
    ours["scheduler.alphas_cumprod"] = pipe.schedule.alphas_cumprod

    worst = {}
    for name, want in trace.items():
        assert name in ours, f"golden tensor {name} has no counterpart in our trace"
        layout = _golden_layout(name, want.shape)
        want = want.transpose(_LAYOUTS[layout]) if layout else want
        got = ours[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        if name.split(".")[0] in tables:
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=name)
        elif name == "scheduler.alphas_cumprod":  # float64; torch's sqrt is off by an ulp in a few places
            np.testing.assert_allclose(got, want, rtol=1e-14, err_msg=name)
        elif not np.issubdtype(want.dtype, np.floating) or name in ("timesteps", "steps.guidance_scale"):
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            worst[name] = rel_err(got, want)
    print(f"{case.name}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
    bad = {k: v for k, v in worst.items() if v > 1e-5}
    assert not bad, f"fp32 relative error above 1e-5: {bad}"


def test_reference_matters():
    """Sanity of the fixture itself: the reference stream changes the target output, so a model
    that ignored it could not pass `test_golden` (README: 0.5x the reference moves it by 3.9e-2)."""
    case = next(c for c in CASES if _kind(c)[0] == "model")
    cfg, params = convert_transformer(str(case))
    inp = load_file(case / "inputs.safetensors")
    run = lambda ref: cogvideox.CogVideoXTransformer(cfg).apply(
        {"params": params}, channels_last(inp["hidden_states"]), inp["encoder_hidden_states"],
        inp["timestep"], ref, inp["encoder_hidden_states_mot_ref"])
    ref = channels_last(inp["hidden_states_mot_ref"])
    assert rel_err(run(0.5 * ref), run(ref)) > 1e-3
