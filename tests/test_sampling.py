"""CogVideoX DDIM sampler and CFG against diffusers' CogVideoXDDIMScheduler and the official pipeline run.

Tolerance: XLA contracts a·x + b·y into a fused multiply-add (torch rounds both products), so jitted
float32 results may differ from the reference by an ulp; with FMA unavailable to XLA
(XLA_FLAGS=--xla_cpu_max_isa=AVX, see test_bit_exact_without_fma) the v-prediction step, the guidance
and the golden replay are bit-exact.
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import golden_dir, rel_err
from vapjax.sampling import DDIMSchedule, ddim_step, dynamic_cfg_scale, guide, sample_loop

NO_FMA_FLAG = "--xla_cpu_max_isa=AVX"
BIT_EXACT = NO_FMA_FLAG in os.environ.get("XLA_FLAGS", "")
TOL = 0.0 if BIT_EXACT else 1e-6  # relative error (‖Δ‖/‖ref‖)

# Spec §5.1: dynamic CFG scale per step for g=6, S=50, trailing timesteps (4 decimals).
SPEC_DYNAMIC_CFG_G6_S50 = [
    2.2915, 2.5435, 6.9744, 6.4204, 2.7881, 4.2719, 1.0376, 4.1704, 1.6180, 6.9831, 1.0048, 2.8720,
    6.9768, 1.6331, 4.3297, 2.4366, 6.3773, 6.0068, 3.4479, 3.1981, 1.6548, 6.6100, 1.1947, 4.2953,
    6.9854, 1.5213, 1.7616, 1.0579, 4.1275, 1.4823, 2.0026, 5.9477, 4.1432, 6.5305, 6.1398, 6.9999,
    6.1684, 1.1199, 2.0975, 6.6850, 6.9992, 2.3432, 6.2128, 1.2505, 6.9996, 6.8644, 1.0636, 1.0, 1.0,
    1.1234,
]

# The CogVideoX-5B(-I2V) scheduler config (spec §5.1); the golden pipeline case ships the same one.
COGVIDEOX = {
    "_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "sample_max_value": 1.0,
    "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0, "timestep_spacing": "trailing",
    "trained_betas": None,
}

CASE = golden_dir() / "cog_pipeline_tiny"


def _require_golden() -> None:
    if not (CASE / "case.json").exists():
        pytest.fail(f"golden case {CASE} not found (set VAPJAX_GOLDEN_DIR)")


@pytest.fixture(scope="module")
def golden():
    _require_golden()
    return load_file(str(CASE / "trace.safetensors"))


def test_golden_scheduler_config_is_cogvideox():
    _require_golden()
    config = json.loads((CASE / "scheduler" / "scheduler_config.json").read_text())
    assert {k: v for k, v in config.items() if k != "_diffusers_version"} == COGVIDEOX


# The CogVideoX config plus variants that exercise every supported option.
VARIANTS = {
    "cogvideox": {},
    "snr_shift_3": {"snr_shift_scale": 3.0},
    "epsilon_leading": {"prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1},
    "linear_linspace": {"beta_schedule": "linear", "timestep_spacing": "linspace", "set_alpha_to_one": False,
                        "rescale_betas_zero_snr": False},
}


def _pair(variant: str):
    """(ours, diffusers) schedulers from the CogVideoX config with the variant's overrides."""
    import diffusers  # noqa: PLC0415 (test-only reference)
    config = {**COGVIDEOX, **VARIANTS[variant]}
    return DDIMSchedule.from_config(config), diffusers.CogVideoXDDIMScheduler.from_config(config)


def _at(steps, k):
    return jax.tree.map(lambda a: a[k], steps)


_step = jax.jit(ddim_step)


@pytest.mark.parametrize("variant", VARIANTS)
def test_alphas_cumprod_matches_diffusers(variant):
    ours, ref = _pair(variant)
    want = ref.alphas_cumprod.numpy()
    assert ours.alphas_cumprod.dtype == want.dtype
    # torch's float64 sqrt is not always correctly rounded (CPU dependent): an ulp of √ᾱ on ~1% of t.
    np.testing.assert_allclose(ours.alphas_cumprod, want, rtol=0, atol=1e-15)
    assert np.mean(ours.alphas_cumprod == want) >= 0.98


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("num_steps", [1, 3, 4, 7, 50, 1000])
def test_timesteps_match_diffusers(variant, num_steps):
    ours, ref = _pair(variant)
    ref.set_timesteps(num_steps)
    np.testing.assert_array_equal(ours.timesteps(num_steps), ref.timesteps.numpy())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_step_matches_diffusers(variant):
    """50 steps; each step gets the reference's state as input, and our own trajectory is tracked too."""
    import torch

    ours, ref = _pair(variant)
    ref.set_timesteps(50)
    steps = ours.steps(50)
    rng = np.random.default_rng(0)
    x_ref = rng.standard_normal((1, 3, 16, 8, 12)).astype(np.float32)
    x_own = x_ref
    worst = 0.0
    for k, t in enumerate(ref.timesteps):
        out = rng.standard_normal(x_ref.shape).astype(np.float32)
        prev, x0 = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_ref), return_dict=False)
        got_prev, got_x0 = _step(_at(steps, k), jnp.asarray(x_ref), jnp.asarray(out))
        worst = max(worst, rel_err(got_prev, prev.numpy()), rel_err(got_x0, x0.numpy()))
        x_own = np.asarray(_step(_at(steps, k), jnp.asarray(x_own), jnp.asarray(out))[0])
        x_ref = prev.numpy()
    assert worst <= 1e-6, worst
    assert rel_err(x_own, x_ref) <= 2e-6
    if BIT_EXACT and variant in ("cogvideox", "snr_shift_3"):
        # Not the others: XLA divides by a scalar via its reciprocal (epsilon), and torch's float32 sqrt
        # (the "linear" schedule is float32 end to end) is not correctly rounded on every CPU.
        assert worst == 0.0


def test_bf16_latents_step_like_torch():
    """bf16 latents (the official bf16 runs) with a float32 prediction: torch rounds the coefficient and the
    product with the latents to bf16."""
    import torch

    ours, ref = _pair("cogvideox")
    ref.set_timesteps(50)
    steps = ours.steps(50)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32)).bfloat16()
    v = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32))
    for k in range(50):
        prev, x0 = ref.step(v, ref.timesteps[k], x, return_dict=False)
        got_prev, got_x0 = _step(_at(steps, k), jnp.asarray(x.float().numpy()).astype(jnp.bfloat16), jnp.asarray(v))
        assert got_prev.dtype == jnp.float32 and prev.dtype == torch.float32
        assert rel_err(got_prev, prev.numpy()) <= TOL and rel_err(got_x0, x0.numpy()) <= TOL


def test_add_noise_and_velocity_match_diffusers():
    import torch

    ours, ref = _pair("cogvideox")
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((4, 3, 8)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 250, 511, 999])
    want_xt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    assert rel_err(ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), t), want_xt) <= 1e-6
    assert rel_err(ours.velocity(jnp.asarray(x0), jnp.asarray(noise), t), want_v) <= 1e-6
    # A scalar t broadcasts over the whole batch.
    assert rel_err(ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), 250),
                   ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), np.full(4, 250))) == 0.0


def test_dynamic_cfg_table_from_spec():
    schedule = DDIMSchedule.from_config(COGVIDEOX)
    timesteps = schedule.timesteps(50)
    np.testing.assert_array_equal(timesteps, np.arange(999, 0, -20))
    got = [dynamic_cfg_scale(6.0, t, 50) for t in timesteps]
    np.testing.assert_allclose(got, SPEC_DYNAMIC_CFG_G6_S50, rtol=0, atol=5e-5)


def test_golden_schedule_and_guidance_scales(golden):
    schedule = DDIMSchedule.from_config(COGVIDEOX)
    np.testing.assert_array_equal(schedule.timesteps(4), golden["timesteps"])
    want = golden["scheduler.alphas_cumprod"]
    # Bit-equal except where the recording machine's torch sqrt rounded differently (an ulp of √ᾱ).
    np.testing.assert_allclose(schedule.alphas_cumprod, want, rtol=0, atol=1e-15)
    assert np.mean(schedule.alphas_cumprod == want) >= 0.99
    scales = [dynamic_cfg_scale(6.0, t, 4) for t in golden["timesteps"]]
    assert scales == golden["steps.guidance_scale"].tolist()  # float64, exact


def test_golden_replay(golden):
    """Recorded guided predictions through our step reproduce the recorded x̂0 and latents."""
    steps = DDIMSchedule.from_config(COGVIDEOX).steps(4)
    pred = golden["steps.noise_pred"]
    guided = golden["steps.noise_pred_guided"]
    for k in range(4):
        x = golden["latents_init"] if k == 0 else golden["steps.latents"][k - 1]
        g = golden["steps.guidance_scale"][k]
        got_guided = guide(jnp.asarray(pred[k, :1]), jnp.asarray(pred[k, 1:]), g)
        assert rel_err(got_guided, guided[k]) <= TOL
        x_prev, x0 = _step(_at(steps, k), jnp.asarray(x), jnp.asarray(guided[k]))
        assert rel_err(x0, golden["steps.pred_original_sample"][k]) <= TOL
        assert rel_err(x_prev, golden["steps.latents"][k]) <= TOL


def test_scan_loop_replays_golden(golden):
    steps = DDIMSchedule.from_config(COGVIDEOX).steps(4)
    recorded = jnp.asarray(golden["steps.noise_pred_guided"])
    seen = []
    final = jax.jit(lambda x: sample_loop(lambda x, t, i: recorded[i], x, steps, progress=seen.append))(
        jnp.asarray(golden["latents_init"]))
    assert rel_err(final, golden["final_latents"]) <= TOL
    jax.effects_barrier()
    assert [int(i) for i in seen] == [0, 1, 2, 3]


def test_scan_loop_equals_python_loop():
    steps = DDIMSchedule.from_config(COGVIDEOX).steps(10)

    def denoise(x, t, i):  # depends on the state, the timestep and the step index
        return jnp.tanh(x) * (t.astype(jnp.float32) / 1000) + 0.01 * i.astype(jnp.float32)

    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 7)).astype(np.float32))
    want = x
    for k in range(len(steps)):
        step = _at(steps, k)
        want = _step(step, want, denoise(want, jnp.asarray(step.timestep), jnp.int32(k)))[0]
    got = jax.jit(lambda x: sample_loop(denoise, x, steps))(x)
    assert got.dtype == x.dtype
    assert rel_err(got, want) <= 1e-6


def test_scan_loop_keeps_bf16_latents():
    steps = DDIMSchedule.from_config(COGVIDEOX).steps(3)
    x = jnp.ones((2, 4), jnp.bfloat16)
    out = sample_loop(lambda x, t, i: jnp.zeros(x.shape, jnp.float32), x, steps)
    assert out.dtype == jnp.bfloat16


def test_scan_loop_casts_to_the_compute_dtype():
    """Latents in another dtype are cast to `dtype` before the first step and after every step (CPIPE:1057):
    bf16 latents into a float32 loop give exactly the float32 run of the same values."""
    steps = DDIMSchedule.from_config(COGVIDEOX).steps(3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4)), jnp.bfloat16)
    seen = []
    denoise = lambda x, t, i: (seen.append(x.dtype), (jnp.tanh(x) * 0.5, {}))[1]  # noqa: E731
    out, history = sample_loop(denoise, x, steps, dtype=jnp.float32, record=True)
    assert out.dtype == history["latents"].dtype == jnp.float32 and set(seen) == {jnp.dtype(jnp.float32)}
    plain = lambda x, t, i: jnp.tanh(x) * 0.5  # noqa: E731
    np.testing.assert_array_equal(sample_loop(plain, x, steps, dtype=jnp.float32),
                                  sample_loop(plain, x.astype(jnp.float32), steps))
    assert sample_loop(plain, x.astype(jnp.float32), steps, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_dynamic_cfg_scale_formula():
    # t = S gives exactly 1; the scale is evaluated with Python floats (no numpy rounding differences).
    assert dynamic_cfg_scale(6.0, 50, 50) == 1.0
    t, s = 999, 50
    assert dynamic_cfg_scale(6.0, np.int64(t), s) == 1 + 6.0 * ((1 - math.cos(math.pi * ((s - t) / s) ** 5.0)) / 2)


@pytest.mark.parametrize("override, words", [
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ({"thresholding": True}, "thresholding"),
    ({"_class_name": "DDIMScheduler"}, "DDIMScheduler"),
])
def test_from_config_rejects_unsupported(override, words):
    with pytest.raises(ValueError, match=words) as info:
        DDIMSchedule.from_config({**COGVIDEOX, **override})
    assert "\n" not in str(info.value)


def test_schedule_is_immutable_and_checks_steps():
    schedule = DDIMSchedule.from_config(COGVIDEOX)
    with pytest.raises(ValueError):
        schedule.alphas_cumprod[0] = 0.0
    with pytest.raises(ValueError, match="num_steps"):
        schedule.timesteps(0)


def test_bit_exact_without_fma():
    """The golden replay in a process where XLA cannot emit FMA is bit-exact (TOL = 0 there).

    Run this whole file with XLA_FLAGS=--xla_cpu_max_isa=AVX to get the bit-exact diffusers comparisons too.
    The subprocess runs whatever this process's flags are (no skip): the flag only caps XLA's ISA.
    """
    _require_golden()
    tests = os.path.dirname(os.path.abspath(__file__))
    path = [os.path.dirname(tests), tests] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") if BIT_EXACT else
           f"{os.environ.get('XLA_FLAGS', '')} {NO_FMA_FLAG}".strip()}
    code = ("import test_sampling as t; assert t.TOL == 0; g = t.load_file(str(t.CASE / 'trace.safetensors')); "
            "t.test_golden_replay(g); t.test_scan_loop_replays_golden(g)")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
