"""Parity of one training step with the official trainer's recorded SFT steps.

Every golden case folder whose case.json has `training` is discovered, not listed, and checked by the
handler of its official model class: convert the official checkpoint with our converter, build the
model inputs with OUR conditioning code from the recorded tensors, take the recorded noise and σ / t,
compute the loss and the expert gradients with OUR objective and compare with the official loss and
the official gradient of every `_mot_ref` parameter, mapped to our tree by the converter's rules.
- CogVideoX: `conditioning.cogvideox` on the recorded posterior samples (× the scaling factor),
  `training.cogvideox_loss` on `training.cogvideox_predictor`.
- Wan: `conditioning.wan` on the recorded normalised latents and conditions (its I2V mask must equal
  the recorded one), `training.flow_matching_loss` on `training.wan_predictor` (reference timestep 1).
Tolerance: a case that carries the step in float64 (expected*_fp64.safetensors, and case.json
`fp32_vs_fp64`: the official float32 step's own error against it) bounds our float32 loss and every expert
gradient against float64 by the official float32 error of the same tensor (FP64_FACTOR x it + FP64_FLOOR):
"as accurate as the official code", not a flat number, which fails a faithful port on a case with more
cancellation (cog_train_step_2ref's t = 0 sample: the official step itself is off by 2.9e-5) and passes
a sloppy one on an easy case. Without float64 (Wan), relative error ≤ 1e-5 against the official float32
step. Parameters with no path to the loss must get exactly zero gradient.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import golden_cases, golden_dir, rel_err
from convert.cogvideox import convert_transformer, rules, target_shapes
from convert.wan import convert_transformer as wan_convert_transformer
from convert.wan import rules as wan_rules
from convert.wan import target_shapes as wan_target_shapes
from vapjax import conditioning, training
from vapjax import tree as vtree
from vapjax.models import cogvideox, wan
from vapjax.sampling import DDIMSchedule


class GoldenCaseError(ValueError):
    """A golden case folder we cannot read (one-line message)."""


def _json(path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GoldenCaseError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise GoldenCaseError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def require(meta: dict, where, **types) -> None:
    """One-line error unless every `key=type` is present in `meta` with that type."""
    for key, typ in types.items():
        if key not in meta:
            raise GoldenCaseError(f"{where}: no '{key}'")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool) and typ is not bool:
            raise GoldenCaseError(f"{where}: '{key}' is {type(meta[key]).__name__}, expected "
                                  f"{getattr(typ, '__name__', typ)}")


def load_training_case(case) -> tuple[dict, str]:
    """(case.json, the official model class from config.json) of a training case; one-line errors."""
    meta = _json(case / "case.json")
    require(meta, case / "case.json", training=str, num_mot_ref=int, zero_grad_params=list)
    cls = _json(case / "config.json").get("_class_name")
    if not isinstance(cls, str):
        raise GoldenCaseError(f"{case / 'config.json'}: no '_class_name'")
    return meta, cls


def _is_training(case) -> bool:
    """Discovery never raises: a case.json we cannot parse is kept, so its test reports it in one line."""
    try:
        meta = json.loads((case / "case.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return True
    return not isinstance(meta, dict) or "training" in meta


def _model_class(case) -> str | None:
    try:
        return json.loads((case / "config.json").read_text()).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


CASES = [c for c in golden_cases() if _is_training(c)]


def _param(case):
    return pytest.param(case, id=case.name)


def channels_last(x: np.ndarray) -> jnp.ndarray:
    """Official [..., F, C, H, W] -> our [..., F, H, W, C]."""
    return jnp.asarray(np.moveaxis(x, -3, -1))


def check_cogvideox_step(case, meta: dict) -> None:
    require(meta, case / "case.json", scaling_factor=(int, float), scheduler=dict)
    cfg, params = convert_transformer(str(case))
    inp = load_file(case / "inputs.safetensors")
    expected = load_file(case / "expected.safetensors")
    want_grads = load_file(case / "expected_grads.safetensors")
    n, sf = meta["num_mot_ref"], meta["scaling_factor"]
    got_n = inp["ref_latents"].shape[1]
    assert got_n == n, f"{case.name}: inputs hold {got_n} references, case.json says num_mot_ref {n}"

    # The recorded t is what our timestep table gives for the recorded σ (σ = timesteps[idx] / 1000).
    t = inp["timesteps"].astype(np.int32)
    idx = 999 - np.round(inp["sigmas"].astype(np.float64) * 1000).astype(int)
    np.testing.assert_array_equal(training.ddim_timestep_table()[idx], t, err_msg="σ -> t")

    x0 = sf * channels_last(inp["latents"])
    cond = conditioning.cogvideox(sf * channels_last(inp["image_latents"]), sf * channels_last(inp["ref_latents"]),
                                  sf * channels_last(inp["ref_image_latents"]), jnp.asarray(inp["text"]),
                                  jnp.asarray(inp["ref_text"]))
    noise = channels_last(inp["noise"])
    alphas = DDIMSchedule.from_config(meta["scheduler"]).alphas_cumprod
    trainable, frozen = training.split_params(params)
    model = cogvideox.CogVideoXTransformer(cfg)

    def loss_fn(tr):
        predict = training.cogvideox_predictor(model, vtree.merge(tr, frozen), cond)
        return training.cogvideox_loss(predict, x0, noise, t, alphas)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(trainable)
    compare_step(case, meta, loss, grads, expected, want_grads, rules(cfg, target_shapes(cfg)))


# Against float64, our float32 step may be FP64_FACTOR times as far off as the official float32 step, plus
# FP64_FLOOR: float32 rounding differs with the order of operations (XLA's fusions and reductions are not
# torch's), so at equal care two float32 steps differ by a small factor either way (measured 0.6-1.05 per
# gradient on the shared cases); the floor, ~16 float32 roundings (unit roundoff 6e-8), covers a tensor the
# official step happens to get almost exact (its loss on cog_train_step: 3.6e-8, ours 4.3e-7).
# A k-bias gradient is not pure rounding noise here: softmax is invariant to a bias added to every key,
# but CogVideoX's per-head norm_k (LayerNorm) and RoPE come after to_k, so its float64 gradient is as large
# as the q-bias one (4.8e-3 / 3.9e-3 in layer 0 of cog_train_step) and the sum over tokens cancels only 3-9x
# (sum |c| / |sum c| of the cotangent c at to_k's output). Our float32 sum over tokens is within 1.3e-7 of
# the exact sum of our own cotangents, so its reduction is not where a to_k.bias error comes from. On a
# 3-reference, 3-expert-layer step made like the goldens (official code, float32 and float64 with the same
# constants) every gradient of ours is within 2.1x the official float32 error and the middle layer's
# to_k.bias is no outlier. Note: cog_train_step_2ref's float64 run weights its t = 0 sample by
# 1/(1 - float32 ᾱ) while both float32 steps use float32(1/(1 - float64 ᾱ)) (3.5e-5 apart), which is most of
# the 1.6e-5 / 2.9e-5 "error" both steps share there; with equal constants the official float32 step is
# within 3.1e-8 (loss) / 9.6e-7 (worst gradient) of float64, so that case's bounds are loose.
FP64_FACTOR, FP64_FLOOR = 2.0, 1e-6
FLAT_TOL = 1e-5  # against the official float32 step, for a case without float64 (Wan)


def reference_and_bounds(case, meta: dict, expected: dict, want_grads: dict):
    """(loss, gradients, bound of the loss, bound per gradient key): float64 and the official float32 step's
    own error where the case has them, else the official float32 step and FLAT_TOL."""
    if not (case / "expected_grads_fp64.safetensors").exists():
        return expected["loss"], want_grads, FLAT_TOL, dict.fromkeys(want_grads, FLAT_TOL)
    require(meta, case / "case.json", fp32_vs_fp64=dict)
    official, grads64 = meta["fp32_vs_fp64"], load_file(case / "expected_grads_fp64.safetensors")
    # A gradient that is exactly zero in float64 has no relative error to record (the last expert layer's
    # queries feed only the reference stream's discarded output): ours must be exactly zero too.
    exact_zero = {k for k in want_grads if not np.any(grads64[k])}
    missing = sorted(k for k in want_grads if k not in official.get("grads", {}) and k not in exact_zero)
    assert not missing and "loss" in official, f"{case}/case.json fp32_vs_fp64 lacks {missing[:3] or 'loss'}"
    bound = lambda err: FP64_FACTOR * err + FP64_FLOOR  # noqa: E731
    return (load_file(case / "expected_fp64.safetensors")["loss"], grads64, bound(official["loss"]),
            {k: 0.0 if k in exact_zero else bound(official["grads"][k]) for k in want_grads})


def compare_step(case, meta: dict, loss, grads, expected: dict, want_grads: dict, conversion_rules) -> None:
    """Our loss and every expert gradient against the reference (float64 where the case has it, else the
    official float32 step), through the converter's key mapping; every trainable slot of ours has an
    official gradient, and the listed no-path parameters get exact zeros."""
    want_loss, want_grads, loss_bound, bounds = reference_and_bounds(case, meta, expected, want_grads)
    loss_err = rel_err(np.reshape(loss, (1,)), want_loss)
    flat = vtree.flatten(grads)
    by_key = {r.src: r for r in conversion_rules if r.dst in flat}
    zero = set(meta["zero_grad_params"])
    assert zero <= set(want_grads), f"zero_grad_params not in expected_grads: {sorted(zero - set(want_grads))}"
    assert not set(want_grads) - set(by_key), f"official gradients without a trainable counterpart: " \
                                              f"{sorted(set(want_grads) - set(by_key))[:5]}"
    assert not set(by_key) - set(want_grads), f"trainable parameters without an official gradient: " \
                                              f"{sorted(set(by_key) - set(want_grads))[:5]}"
    errs = {}
    for key, want in want_grads.items():
        r = by_key[key]
        got = np.asarray(flat[r.dst] if r.index is None else flat[r.dst][r.index])
        want = r.transform.apply(want)
        if key in zero:
            assert not np.any(want), f"official {key} listed as zero but is not"
            assert not np.any(got), f"{key}: no path to the loss, yet our gradient is {np.abs(got).max():.1e}"
        else:
            errs[key] = rel_err(got, want)
    worst = max(errs, key=lambda k: errs[k] / max(bounds[k], 1e-30))  # nearest its bound
    vs = "float64" if (case / "expected_grads_fp64.safetensors").exists() else "official float32"
    print(f"{case.name}: loss {float(loss):.7f} (official {float(expected['loss'][0]):.7f}), rel. error vs "
          f"{vs} {loss_err:.1e} (bound {loss_bound:.1e}); {len(errs)} expert gradients, worst {errs[worst]:.1e} "
          f"({worst}, bound {bounds[worst]:.1e}); {len(zero)} zero gradients exactly zero")
    assert loss_err <= loss_bound, f"loss: relative error {loss_err:.1e} vs {vs}, bound {loss_bound:.1e}"
    bad = {k: f"{v:.1e} > {bounds[k]:.1e}" for k, v in errs.items() if v > bounds[k]}
    assert not bad, f"expert gradients beyond their bound (relative error vs {vs}): {bad}"


def check_wan_step(case, meta: dict) -> None:
    cfg, params = wan_convert_transformer(str(case))
    inp = load_file(case / "inputs.safetensors")
    expected = load_file(case / "expected.safetensors")
    want_grads = load_file(case / "expected_grads.safetensors")
    assert meta["num_mot_ref"] == 1, f"{case.name}: Wan-VAP takes one reference, case.json says {meta['num_mot_ref']}"

    # The recorded (σ, t) are entries of our flow tables (σ = 1 -> 1000, 0.511 -> 510); the reference's t is 1.
    sigma_table, t_table = training.flow_tables()
    idx = np.round((1 - inp["sigmas"].astype(np.float64)) * 1000).astype(int)
    np.testing.assert_array_equal(sigma_table[idx], inp["sigmas"], err_msg="σ")
    np.testing.assert_array_equal(t_table[idx], inp["timesteps"].astype(np.int32), err_msg="σ -> t")
    np.testing.assert_array_equal(inp["ref_timesteps"], 1, err_msg="reference timestep")
    t = jnp.asarray(t_table[idx])

    cl = lambda k: jnp.asarray(np.moveaxis(inp[k], 1, -1))    # official [B, C, F, H, W] -> ours [B, F, H, W, C]
    cond = conditioning.wan(cl("condition"), cl("ref"), cl("ref_condition"), jnp.asarray(inp["text"]),
                            jnp.asarray(inp["ref_text"]), jnp.asarray(inp["image_embeds"]),
                            jnp.asarray(inp["ref_image_embeds"]))
    # Our I2V mask is the one the official processors built (target and reference alike).
    m = inp["mask"].shape[1]
    np.testing.assert_array_equal(cond["condition"][..., :m], cl("mask"), err_msg="target mask")
    np.testing.assert_array_equal(cond["ref_latents"][..., cfg.out_channels:cfg.out_channels + m], cl("mask"),
                                  err_msg="reference mask")
    x0, noise, sigma = cl("x0"), cl("noise"), jnp.asarray(inp["sigmas"])
    trainable, frozen = training.split_params(params)
    model = wan.WanTransformer(cfg)

    def loss_fn(tr, ref_t):
        predict = training.wan_predictor(model, vtree.merge(tr, frozen), cond, ref_t)
        return training.flow_matching_loss(predict, x0, noise, sigma, t)

    step = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = step(trainable, jnp.ones_like(t))
    compare_step(case, meta, loss, grads, expected, want_grads, wan_rules(cfg, wan_target_shapes(cfg)))
    # The tolerance catches CogVideoX's convention (the expert modulated by the target's t, not 1).
    wrong_err = rel_err(np.reshape(step(trainable, t)[0], (1,)), expected["loss"])
    print(f"{case.name}: with the reference at the target's t the loss is off by {wrong_err:.1e}")
    assert wrong_err > 1e-3


HANDLERS = {"CogVideoXTransformer3DMOTModel": check_cogvideox_step, "WanTransformer3DMOTModel": check_wan_step}


def test_golden_training_cases_found():
    cogs = [c for c in CASES if _model_class(c) == "CogVideoXTransformer3DMOTModel"]
    assert cogs, f"no CogVideoX training case (case.json with 'training') under {golden_dir()}"


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_golden_training_step(case):
    try:
        meta, cls = load_training_case(case)
        if cls not in HANDLERS:
            raise GoldenCaseError(f"{case}: no training-step check for official model {cls!r}")
    except GoldenCaseError as e:
        pytest.fail(str(e), pytrace=False)
    HANDLERS[cls](case, meta)


@pytest.mark.parametrize("text, complaint", [
    ("{not json", "unreadable (JSONDecodeError"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"training": "x", "num_mot_ref": 1}', "no 'zero_grad_params'"),
    ('{"training": "x", "num_mot_ref": "1", "zero_grad_params": []}', "'num_mot_ref' is str, expected int"),
])
def test_malformed_case_json_is_a_one_line_error(tmp_path, text, complaint):
    (tmp_path / "case.json").write_text(text)
    (tmp_path / "config.json").write_text('{"_class_name": "CogVideoXTransformer3DMOTModel"}')
    assert _is_training(tmp_path)    # discovered, so its own test reports it
    with pytest.raises(GoldenCaseError) as e:
        load_training_case(tmp_path)
    assert complaint in str(e.value) and "\n" not in str(e.value) and "case.json" in str(e.value), str(e.value)
