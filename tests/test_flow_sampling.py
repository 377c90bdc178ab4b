"""Wan's flow samplers (UniPC with flow sigmas, flow-match Euler) against diffusers and the official run.

The reference for UniPC is stock diffusers' UniPCMultistepScheduler given the official (vendored
0.34.0.dev0) σ spacing explicitly through set_timesteps(sigmas=s) (stock diffusers then applies the same
shift; checked bit-identical to the vendored scheduler on every case below). The fake model is a numpy
function called from both loops (jax.pure_callback inside the scan), so the two runs see bit-identical
model outputs whenever their latents agree.

Tolerance 1e-6 relative (‖Δ‖/‖ref‖ and max|Δ|/max|ref| per step): the host float32 λ = log α − log σ is the
correctly rounded value, torch's vectorised log is an ulp off for a few % of arguments, and XLA may fuse
a·x − b·y; a wrong coefficient, operation order, order warm-up or history slot is off by ≥ 1e-4.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import golden_dir, rel_err
from vapjax.flow_sampling import (FlowMatchEulerSchedule, UniPCSchedule, sample_loop,
                                  schedule_from_config)

TOL = 1e-6
CASE = golden_dir() / "wan_pipeline_tiny"

# The scheduler config of the Wan2.1-I2V-14B-480P diffusers repo (spec §5.2; the golden case ships it).
WAN_480P = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
    "predict_x0": True, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}

SHAPE = (1, 16, 3, 6, 8)  # [B, C, F, H, W]


def _fake_model(x: np.ndarray, i: int) -> np.ndarray:
    """A deterministic flow 'prediction' pulling x to a fixed target, with a step-dependent error so the
    multistep history matters. Plain float32 numpy ops: identical wherever it is called."""
    rng = np.random.default_rng(7)
    target = rng.standard_normal(x.shape).astype(np.float32)
    wobble = rng.standard_normal(x.shape).astype(np.float32)
    c, d = np.float32(1 + 0.1 * np.sin(i)), np.float32(0.3 * np.cos(1.7 * i))
    return (x - target) * c + wobble * d


def _latents() -> np.ndarray:
    return np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)


def _run_jax(steps, latents: np.ndarray) -> dict:
    def denoise(x, t, i):
        return jax.pure_callback(lambda x, i: _fake_model(np.asarray(x), int(i)),
                                 jax.ShapeDtypeStruct(x.shape, x.dtype), x, i), {}
    _, history = jax.jit(lambda x: sample_loop(denoise, x, steps, record=True))(jnp.asarray(latents))
    return jax.tree.map(np.asarray, history)


def _run_torch(scheduler, latents: np.ndarray) -> list[np.ndarray]:
    import torch  # noqa: PLC0415 (test-only reference)
    x, out = torch.from_numpy(latents), []
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(torch.from_numpy(_fake_model(x.numpy(), i)), t, x).prev_sample
        out.append(x.numpy())
    return out


def _max_rel(got, want) -> float:
    return float(np.abs(np.float64(got) - want).max() / np.abs(want).max())


def _assert_close_per_step(got: np.ndarray, want: list[np.ndarray]) -> None:
    errs = [(rel_err(g, w), _max_rel(g, w)) for g, w in zip(got, want)]
    assert len(got) == len(want)
    assert max(max(e) for e in errs) <= TOL, errs


def _official_base_sigmas(n: int) -> np.ndarray:
    """The vendored diffusers' unshifted flow σ: reversed 1 − linspace(1, 1/T, n+1), last dropped."""
    return np.flip(1.0 - np.linspace(1, 1 / 1000, n + 1))[:-1].copy()


@pytest.mark.parametrize("shift", [3.0, 5.0])
@pytest.mark.parametrize("num_steps", [4, 10, 50])
def test_unipc_matches_diffusers(shift, num_steps):
    import diffusers  # noqa: PLC0415
    config = {**WAN_480P, "flow_shift": shift}
    ours = UniPCSchedule.from_config(config)
    ref = diffusers.UniPCMultistepScheduler.from_config(config)
    ref.set_timesteps(sigmas=_official_base_sigmas(num_steps))
    np.testing.assert_array_equal(ours.timesteps(num_steps), ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas(num_steps), ref.sigmas.numpy())

    steps = ours.steps(num_steps)
    latents = _latents()
    history = _run_jax(steps, latents)
    want = _run_torch(ref, latents)
    _assert_close_per_step(history["latents"], want)
    # the reference's order warm-up and lower_order_final (diffusers' this_order after the last step is 1)
    assert int(steps.order[-1]) == ref.this_order == 1
    assert list(steps.order) == [1] + [2] * (num_steps - 2) + [1]


def test_unipc_spec_timesteps():
    """Spec §5.2: 50 steps at shift 3 give 999, 992, 985, …, 111, 57; the golden 4-step run 999, 899, 749, 499."""
    s = UniPCSchedule.from_config(WAN_480P)
    t = s.timesteps(50)
    assert list(t[:3]) == [999, 992, 985] and list(t[-2:]) == [111, 57] and t.dtype == np.int64
    assert list(s.timesteps(4)) == [999, 899, 749, 499]


def test_unipc_disable_corrector_and_order_1():
    """Less-used options against diffusers: a disabled corrector step, solver_order 1, bh1."""
    import diffusers  # noqa: PLC0415
    for extra in ({"disable_corrector": [0, 3]}, {"solver_order": 1}, {"solver_type": "bh1"}):
        config = {**WAN_480P, **extra}
        ref = diffusers.UniPCMultistepScheduler.from_config(config)
        ref.set_timesteps(sigmas=_official_base_sigmas(8))
        history = _run_jax(UniPCSchedule.from_config(config).steps(8), _latents())
        _assert_close_per_step(history["latents"], _run_torch(ref, _latents()))


@pytest.mark.parametrize("shift", [1.0, 2.7, 5.0])  # 2.7: not a float32, rounded first as torch does
def test_flow_match_euler_matches_diffusers(shift):
    import diffusers  # noqa: PLC0415
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}
    ours = FlowMatchEulerSchedule.from_config(config)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    np.testing.assert_array_equal(ours.train_sigmas, ref.sigmas.numpy())  # the training σ table
    ref.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps(10), ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas(10), ref.sigmas.numpy())
    history = _run_jax(ours.steps(10), _latents())
    _assert_close_per_step(history["latents"], _run_torch(ref, _latents()))


def test_flow_match_euler_bf16_output_rounds_latents():
    """diffusers casts the Euler result to the model output's dtype: bf16 predictions give bf16 values."""
    steps = FlowMatchEulerSchedule().steps(3)
    x = jnp.asarray(_latents())
    out = sample_loop(lambda x, t, i: (0.5 * x).astype(jnp.bfloat16), x, steps)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, out.astype(jnp.bfloat16).astype(jnp.float32))


def test_from_config_errors_are_one_line():
    bad = [
        ({**WAN_480P, "prediction_type": "epsilon"}, "prediction_type"),
        ({**WAN_480P, "use_flow_sigmas": False}, "use_flow_sigmas"),
        ({**WAN_480P, "solver_order": 3}, "solver_order"),
        ({**WAN_480P, "final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ({**WAN_480P, "lower_order_final": False}, "lower_order_final"),
        ({**WAN_480P, "use_karras_sigmas": True}, "use_karras_sigmas"),
        ({**WAN_480P, "frobnicate": 1}, "frobnicate"),
        ({**WAN_480P, "_class_name": "DDIMScheduler"}, "_class_name"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True}, "stochastic_sampling"),
    ]
    for config, word in bad:
        with pytest.raises(ValueError) as info:
            schedule_from_config(config)
        assert word in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="num_steps"):
        UniPCSchedule.from_config(WAN_480P).steps(0)
    assert UniPCSchedule.from_config({**WAN_480P, "flow_shift": 5}).flow_shift == 5.0


# --- the official pipeline run (golden wan_pipeline_tiny) -------------------------------------------------


@pytest.fixture(scope="module")
def golden():
    if not (CASE / "case.json").exists():
        pytest.fail(f"golden case {CASE} not found (set VAPJAX_GOLDEN_DIR)")


def test_golden_scheduler_config_is_wan_480p(golden):
    config = json.loads((CASE / "scheduler" / "scheduler_config.json").read_text())
    assert {k: v for k, v in config.items() if k != "_diffusers_version"} == WAN_480P


def _check_golden_replay(tol: float) -> None:
    """Feed the recorded guided flow predictions through the scheduler: every recorded latent, x̂0 and
    corrected sample is reproduced within `tol`, with the recorded timesteps, σ and per-step orders exactly."""
    case = json.loads((CASE / "case.json").read_text())
    trace = load_file(str(CASE / "trace.safetensors"))
    schedule = schedule_from_config(json.loads((CASE / "scheduler" / "scheduler_config.json").read_text()))
    n = case["call"]["num_inference_steps"]
    steps = schedule.steps(n)
    np.testing.assert_array_equal(schedule.timesteps(n), trace["timesteps"])
    assert list(schedule.timesteps(n)) == case["derived"]["timesteps"]
    np.testing.assert_array_equal(schedule.sigmas(n), trace["scheduler.sigmas"])
    assert list(steps.order) == [o["this_order"] for o in case["derived"]["unipc_orders"]]
    np.testing.assert_array_equal(steps.timestep, trace["steps.timestep"][:, 0])

    preds = jnp.asarray(trace["steps.noise_pred_guided"])
    final, history = jax.jit(lambda x: sample_loop(
        lambda x, t, i: (preds[i], {}), x, steps, record=True))(jnp.asarray(trace["latents_init"]))
    for ours, theirs in (("latents", "steps.latents"), ("pred_original_sample", "steps.unipc_x0"),
                         ("corrected_sample", "steps.unipc_corrected_sample")):
        for k in range(n):
            got, want = np.asarray(history[ours][k]), trace[theirs][k]
            assert max(rel_err(got, want), _max_rel(got, want)) <= tol, (ours, k)
    np.testing.assert_array_equal(final, history["latents"][-1])


def test_golden_unipc_replay(golden):
    _check_golden_replay(TOL)


def test_golden_unipc_replay_bit_exact_without_fma(golden):
    """In a process where XLA cannot emit FMA the replay is bit-exact: every host coefficient of this
    schedule equals torch's and every latent op is torch's op (the 1e-6 above only absorbs FMA)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    path = [os.path.dirname(tests), tests] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa=AVX".strip()}
    code = "import test_flow_sampling as t; t._check_golden_replay(0.0)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
