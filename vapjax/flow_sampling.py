"""Flow-matching samplers for Wan: UniPC (UniPCMultistepScheduler in the flow-prediction configuration
the Wan diffusers repos ship) and Euler (FlowMatchEulerDiscreteScheduler, also the training σ table).

Host side, numpy, computed once: the σ schedule, the timesteps and every per-step solver coefficient
(`UniPCSteps`, `FlowMatchEulerSteps`: pytrees with a leading step axis). Device side, jittable: the
steps' `update` and `sample_loop`, which runs the whole schedule as one `jax.lax.scan`.

The flow σ schedule is the one of the official implementation's diffusers (0.34.0.dev0, vendored by
VAP): σ = shift·s/(1 + (shift−1)·s) on s = 1 − linspace(1, 1/T, n+1), reversed, last dropped, then a
final 0; timesteps = int64(σ·T) truncated (spec §5.2, §8.15). Current stock diffusers (0.42 here) spaces
them differently (σ = shift(linspace(1, 1/T, n+1)[:-1]) with σ₀ nudged to 1 − 1e−6), e.g. 4 steps at
shift 3: 999, 899, 749, 499 here (the golden run) against 999, 900, 750, 500 there.

Why the coefficients are float32 and computed the way they are: diffusers holds σ as float32 tensors and
derives every solver scalar (λ = log α − log σ, h, e^{−h} − 1, B(h), r_k, the corrector's 2×2 solve) with
float32 0-dim tensor ops, then multiplies float32 latents by those scalars. The host repeats each op in
float32 (numpy float32 scalars round like torch). log and expm1 are the correctly rounded values; torch's
float32 log is MKL's vsLn, an ulp away for ~7% of arguments, which cannot be reproduced portably. The 2×2
solve follows LAPACK's sgesv (partial pivoting, unfused products, triangular solves through reciprocals),
which reproduces torch.linalg.solve bit for bit. On the device each latent op is the reference's op in the
reference's order (true division included, see `_div`), so the jitted loop matches torch bit for bit
except for those λ ulps and the fused multiply-adds XLA may form: the golden 4-step replay is bit-exact
with XLA_FLAGS=--xla_cpu_max_isa=AVX; over 50 steps the error is ≤ 6.1e-7 relative, ~1e-6 at 100 steps
(tests/test_flow_sampling.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vapjax.sampling import _scale

_f32 = np.float32

# UniPCMultistepScheduler's constructor defaults (stock diffusers; the vendored 0.34.0.dev0 has a subset):
# a partial config means what it means to diffusers, so an empty one is the epsilon solver and is refused.
_UNIPC_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
    solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0,
    final_sigmas_type="zero", rescale_betas_zero_snr=False, use_dynamic_shifting=False,
    time_shift_type="exponential", sigma_min=None, sigma_max=None, shift_terminal=None,
)
# Options that do not reach the flow-σ solver (β schedule, timestep spacing, thresholding parameters):
# accepted and ignored. diffusers maps the legacy solver types midpoint/heun/logrho to bh2.
_UNIPC_IGNORED = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "dynamic_thresholding_ratio",
                  "sample_max_value", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
                  "time_shift_type", "sigma_min", "sigma_max")
_SOLVER_TYPES = {"bh1": "bh1", "bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}

_EULER_DEFAULTS = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    time_shift_type="exponential", stochastic_sampling=False,
)
# Only used by dynamic (resolution-dependent) shifting, which is refused.
_EULER_IGNORED = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")


def _check_keys(config: Mapping[str, Any], cls_name: str, defaults: dict) -> dict:
    """Merge a diffusers config dict over the constructor defaults; unknown keys raise a one-line error."""
    got = config.get("_class_name", cls_name)
    if got != cls_name:
        raise ValueError(f"scheduler config: expected _class_name {cls_name}, got {got}")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"scheduler config: unsupported option(s) {', '.join(unknown)} for {cls_name}")
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"scheduler config: {message}")


def _check_common(cfg: dict) -> None:
    T = cfg["num_train_timesteps"]
    _require(isinstance(T, int) and not isinstance(T, bool) and T > 1,
             f"num_train_timesteps must be an int > 1, got {T!r}")
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting"):
        _require(not cfg[key], f"{key}=True is not supported")
    _require(not cfg["shift_terminal"], f"shift_terminal={cfg['shift_terminal']!r} is not supported")


def _check_steps(num_steps: int, limit: int) -> None:
    if not (isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= limit):
        raise ValueError(f"num_steps must be an int in 1..{limit}, got {num_steps!r}")


# ---------------------------------------------------------------------------------------------------------
# float32 scalar arithmetic as torch does it on 0-dim float32 tensors


def _log32(x) -> np.float32:
    """float32 log, correctly rounded; log 0 = −inf (the final flow σ)."""
    x = float(x)
    return _f32(-math.inf) if x == 0.0 else _f32(math.log(x))


def _expm1_32(x) -> np.float32:
    return _f32(math.expm1(float(x)))  # expm1(−inf) = −1: the step to σ = 0


def _flow_lambda(sigma: np.float32) -> np.float32:
    """Half log-SNR λ = log α − log σ of a flow σ (α = 1 − σ), in float32; +inf at σ = 0."""
    return _f32(_log32(_f32(1) - sigma) - _log32(sigma))


def _solve2(rk: np.float32, b1: np.float32, b2: np.float32) -> tuple[np.float32, np.float32]:
    """Solve [[1, 1], [rk, 1]]·ρ = b in float32 as LAPACK sgesv does (torch.linalg.solve on CPU).

    LU with partial pivoting (swap rows when |rk| > 1), unfused products; the triangular solves multiply by
    the pivot's reciprocal instead of dividing (checked bit-exact against torch on random systems).
    """
    a11, a12, a21, a22, y1, y2 = _f32(1), _f32(1), _f32(rk), _f32(1), _f32(b1), _f32(b2)
    if abs(a21) > abs(a11):
        a11, a12, a21, a22, y1, y2 = a21, a22, a11, a12, y2, y1
    l21 = _f32(a21 / a11)
    u22 = _f32(a22 - _f32(l21 * a12))
    y2 = _f32(y2 - _f32(l21 * y1))
    x2 = _f32(y2 * _f32(_f32(1) / u22))
    x1 = _f32(_f32(y1 - _f32(a12 * x2)) * _f32(_f32(1) / a11))
    return x1, x2


def _bh_coefficients(sigmas: np.ndarray, t: int, s0: int, s1: int | None, bh2: bool) -> dict:
    """Scalars of one UniPC B(h) update in data prediction from σ[s0] to σ[t], with the second history
    point σ[s1] (order 2) or none (order 1): as diffusers' multistep_uni_{p,c}_bh_update compute them.

    Returns x (weight of the sample), m0 (of the newest x̂0), res (of the correction term), rk and b₁, b₂.
    """
    sigma_t, sigma_s0 = sigmas[t], sigmas[s0]
    alpha_t = _f32(_f32(1) - sigma_t)
    lambda_s0 = _flow_lambda(sigma_s0)
    h = _f32(_flow_lambda(sigma_t) - lambda_s0)
    rk = _f32(1) if s1 is None else _f32(_f32(_flow_lambda(sigmas[s1]) - lambda_s0) / h)
    hh = -h  # predict_x0
    h_phi_1 = _expm1_32(hh)
    b_h = h_phi_1 if bh2 else hh
    h_phi_k = _f32(_f32(h_phi_1 / hh) - _f32(1))
    b1 = _f32(_f32(h_phi_k * _f32(1)) / b_h)
    h_phi_k = _f32(_f32(h_phi_k / hh) - _f32(0.5))
    b2 = _f32(_f32(h_phi_k * _f32(2)) / b_h)
    return dict(x=_f32(sigma_t / sigma_s0), m0=_f32(alpha_t * h_phi_1), res=_f32(alpha_t * b_h),
                rk=rk, b1=b1, b2=b2)


# ---------------------------------------------------------------------------------------------------------
# UniPC


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UniPCSteps:
    """Per-step constants of one UniPC run (flow prediction, data-prediction B(h) solver), leading axis =
    step; a pytree for `jax.lax.scan`. All coefficients float32 (see the module docstring).

    Step k: x̂0_k = x_k − σ_k·v_k; then (k > 0) the UniC corrector refines x_k from x_{k−1} with x̂0_{k−2..k};
    then the UniP predictor goes from σ_k to σ_{k+1} with x̂0_{k−1..k}. Order 1 terms carry zero weights
    (ρ = 0, r = 1), which is exact: they add ±0.
    """
    timestep: Any        # int32 [S]: t fed to the model, int(σ·T)
    sigma: Any           # float32 [S]: σ_k
    order: Any           # int32 [S]: predictor order (diffusers' this_order)
    use_corrector: Any   # bool [S]: UniC runs at step k (never at k = 0)
    p_x: Any             # float32 [S]: predictor x_{k+1} = p_x·x_k − p_m0·x̂0_k − p_res·ρ_p·(x̂0_{k−1} − x̂0_k)/p_rk
    p_m0: Any
    p_res: Any
    p_rk: Any
    p_rho: Any           # 0.5 (order 2) or 0
    c_x: Any             # corrector x_k ← c_x·x_{k−1} − c_m0·x̂0_{k−1}
    c_m0: Any            #   − c_res·(c_rho·(x̂0_{k−2} − x̂0_{k−1})/c_rk + c_rho_t·(x̂0_k − x̂0_{k−1}))
    c_res: Any
    c_rk: Any
    c_rho: Any
    c_rho_t: Any

    def __len__(self) -> int:
        return len(self.timestep)

    def init(self, latents):
        """Scheduler state beside the latents: (last_sample, x̂0_{k−1}, x̂0_{k−2}), zeros before step 0."""
        zeros = jnp.zeros_like(latents)
        return zeros, zeros, zeros

    def update(self, x, state, model_output):
        """One UniPC step (`self` holds scalars: one slice of a UniPCSteps).

        Returns (x_next, state, record). model_output is the flow (velocity) prediction at x; its products
        with σ round like torch's (to model_output's dtype), everything after is in x's dtype (float32 in
        the Wan pipeline: its latents stay float32 whatever the transformer's dtype).
        """
        last_sample, m1, m2 = state
        x0 = (x - _scale(self.sigma, model_output)).astype(x.dtype)  # convert_model_output
        corr_res = _scale(self.c_rho, _div(m2 - m1, self.c_rk)) + _scale(self.c_rho_t, x0 - m1)
        corrected = _bh_update(last_sample, m1, corr_res, self.c_x, self.c_m0, self.c_res)
        x = jnp.where(self.use_corrector, corrected, x)
        pred_res = _scale(self.p_rho, _div(m1 - x0, self.p_rk))
        x_next = _bh_update(x, x0, pred_res, self.p_x, self.p_m0, self.p_res)
        return x_next, (x, x0, m1), {"pred_original_sample": x0, "corrected_sample": x}


def _div(x, c):
    """x / c for a scalar c, correctly rounded per element as torch divides. XLA rewrites a division by a
    broadcast scalar into a product with its reciprocal (an ulp off in ~40% of elements); the barrier hides
    the broadcast from that rewrite (it materialises one latent-sized array of c)."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(c, x.dtype), x.shape))


def _bh_update(x, m0, res, c_x, c_m0, c_res):
    """x_t = (σ_t/σ_s)·x − α_t·hφ₁·m0 − α_t·B(h)·res, with diffusers' operation order."""
    return _scale(c_x, x) - _scale(c_m0, m0) - _scale(c_res, res)


@dataclasses.dataclass(frozen=True)
class UniPCSchedule:
    """UniPCMultistepScheduler with flow sigmas and flow prediction; build it with `from_config`."""
    flow_shift: float
    num_train_timesteps: int = 1000
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UniPCSchedule:
        """From a diffusers scheduler_config.json dict; unsupported options raise a one-line ValueError."""
        cfg = _check_keys(config, "UniPCMultistepScheduler", _UNIPC_DEFAULTS)
        _check_common(cfg)
        _require(cfg["prediction_type"] == "flow_prediction",
                 f"prediction_type={cfg['prediction_type']!r} is not supported (only 'flow_prediction')")
        _require(cfg["use_flow_sigmas"] is True, "use_flow_sigmas must be true (the flow-matching solver)")
        _require(cfg["predict_x0"] is True, "predict_x0=False is not supported with flow_prediction")
        _require(cfg["solver_order"] in (1, 2), f"solver_order={cfg['solver_order']!r} is not supported (1 or 2)")
        _require(cfg["solver_type"] in _SOLVER_TYPES, f"solver_type={cfg['solver_type']!r} is not supported")
        _require(not cfg["thresholding"], "thresholding=True is not supported")
        _require(cfg["solver_p"] is None, "solver_p is not supported")
        _require(cfg["final_sigmas_type"] == "zero",
                 f"final_sigmas_type={cfg['final_sigmas_type']!r} is not supported (only 'zero'; "
                 "'sigma_min' makes the last flow step h = 0)")
        _require(cfg["lower_order_final"] or cfg["solver_order"] == 1,
                 "lower_order_final=False with solver_order 2 divides by zero at the last step (σ = 0)")
        shift = cfg["flow_shift"]
        _require(isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0,
                 f"flow_shift must be a number > 0, got {shift!r}")
        disabled = cfg["disable_corrector"]
        _require(isinstance(disabled, (list, tuple)) and all(isinstance(i, int) for i in disabled),
                 f"disable_corrector must be a list of step indices, got {disabled!r}")
        return cls(flow_shift=float(shift), num_train_timesteps=cfg["num_train_timesteps"],
                   solver_order=cfg["solver_order"], solver_type=_SOLVER_TYPES[cfg["solver_type"]],
                   lower_order_final=bool(cfg["lower_order_final"]), disable_corrector=tuple(disabled))

    def _flow_sigmas(self, num_steps: int) -> np.ndarray:
        """The n shifted flow σ in float64 (the official diffusers' spacing, module docstring)."""
        _check_steps(num_steps, self.num_train_timesteps)
        T, shift = self.num_train_timesteps, self.flow_shift
        s = 1.0 - np.linspace(1, 1 / T, num_steps + 1)
        return np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()

    def timesteps(self, num_steps: int) -> np.ndarray:
        """Inference timesteps, int64 [S] descending: σ·T truncated."""
        return (self._flow_sigmas(num_steps) * self.num_train_timesteps).astype(np.int64)

    def sigmas(self, num_steps: int) -> np.ndarray:
        """σ_0..σ_S, float32 [S+1] (last = 0), as diffusers' scheduler.sigmas."""
        return np.concatenate([self._flow_sigmas(num_steps), [0.0]]).astype(np.float32)

    def orders(self, num_steps: int) -> np.ndarray:
        """Predictor order per step: warm-up from 1 (lower_order_nums), 1 at the last step (lower_order_final)."""
        orders, done = [], 0
        for k in range(num_steps):
            order = min(self.solver_order, num_steps - k) if self.lower_order_final else self.solver_order
            orders.append(min(order, done + 1))
            done = min(done + 1, self.solver_order)
        return np.array(orders, np.int32)

    def steps(self, num_steps: int) -> UniPCSteps:
        """Host-computed constants for `num_steps` UniPC steps."""
        sigmas, orders = self.sigmas(num_steps), self.orders(num_steps)
        bh2 = self.solver_type == "bh2"
        rows = {k: [] for k in ("p_x", "p_m0", "p_res", "p_rk", "p_rho",
                                "c_x", "c_m0", "c_res", "c_rk", "c_rho", "c_rho_t")}
        use_corrector = []
        for k, order in enumerate(orders):
            p = _bh_coefficients(sigmas, k + 1, k, k - 1 if order == 2 else None, bh2)
            for name in ("x", "m0", "res", "rk"):
                rows["p_" + name].append(p[name])
            rows["p_rho"].append(_f32(0.5 if order == 2 else 0.0))
            # Corrector of step k: redoes the step k−1 → k with the order the predictor used there.
            use_corrector.append(k > 0 and (k - 1) not in self.disable_corrector)
            if k == 0:  # no corrector: finite placeholders, the result is discarded
                c = dict(x=_f32(1), m0=_f32(0), res=_f32(0), rk=_f32(1))
                rho, rho_t = _f32(0), _f32(0)
            else:
                prev_order = orders[k - 1]
                c = _bh_coefficients(sigmas, k, k - 1, k - 2 if prev_order == 2 else None, bh2)
                rho, rho_t = _solve2(c["rk"], c["b1"], c["b2"]) if prev_order == 2 else (_f32(0), _f32(0.5))
            for name in ("x", "m0", "res", "rk"):
                rows["c_" + name].append(c[name])
            rows["c_rho"].append(rho)
            rows["c_rho_t"].append(rho_t)
        return UniPCSteps(
            timestep=self.timesteps(num_steps).astype(np.int32), sigma=sigmas[:-1], order=orders,
            use_corrector=np.array(use_corrector), **{k: np.array(v, np.float32) for k, v in rows.items()})


# ---------------------------------------------------------------------------------------------------------
# Flow-match Euler


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlowMatchEulerSteps:
    """Per-step constants of one flow-match Euler run, leading axis = step; a pytree for `jax.lax.scan`."""
    timestep: Any  # float32 [S]: σ·T fed to the model (not an integer)
    sigma: Any     # float32 [S]: σ_k
    dt: Any        # float32 [S]: σ_{k+1} − σ_k (negative)

    def __len__(self) -> int:
        return len(self.timestep)

    def init(self, latents):
        return ()

    def update(self, x, state, model_output):
        """x_{k+1} = x_k + dt·v in float32, rounded to the model output's dtype as diffusers does (the
        caller keeps the latents' dtype: with bf16 outputs and float32 latents the values are bf16's)."""
        x_next = (x.astype(jnp.float32) + _scale(self.dt, model_output)).astype(model_output.dtype)
        x0 = x.astype(jnp.float32) - _scale(self.sigma, model_output)
        return x_next, state, {"pred_original_sample": x0}


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerSchedule:
    """FlowMatchEulerDiscreteScheduler (static shift); build it with `from_config`."""
    shift: float = 1.0
    num_train_timesteps: int = 1000

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowMatchEulerSchedule:
        """From a diffusers scheduler_config.json dict; unsupported options raise a one-line ValueError."""
        cfg = _check_keys(config, "FlowMatchEulerDiscreteScheduler", _EULER_DEFAULTS)
        _check_common(cfg)
        for key in ("invert_sigmas", "stochastic_sampling"):
            _require(not cfg[key], f"{key}=True is not supported")
        shift = cfg["shift"]
        _require(isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0,
                 f"shift must be a number > 0, got {shift!r}")
        return cls(shift=float(shift), num_train_timesteps=cfg["num_train_timesteps"])

    @property
    def train_sigmas(self) -> np.ndarray:
        """The scheduler's σ table, float32 [T] descending from 1 (shifted (T−i)/T), which training indexes
        (σ = sigmas[idx], spec §7.4). float32 ops as the constructor's torch code: t/T, then the shift."""
        T = self.num_train_timesteps
        s = np.linspace(1, T, T, dtype=np.float32)[::-1] / _f32(T)
        return (_f32(self.shift) * s / (_f32(1) + _f32(self.shift - 1) * s)).astype(np.float32)

    def _inference_sigmas(self, num_steps: int) -> np.ndarray:
        _check_steps(num_steps, self.num_train_timesteps)
        T, shift, table = self.num_train_timesteps, self.shift, self.train_sigmas
        # set_timesteps spaces the *shifted* table's ends and shifts again (diffusers does, so do we).
        s = np.linspace(float(table[0]) * T, float(table[-1]) * T, num_steps) / T
        return (shift * s / (1 + (shift - 1) * s)).astype(np.float32)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """Inference timesteps, float32 [S]: σ·T (in float32, not truncated)."""
        return self._inference_sigmas(num_steps) * _f32(self.num_train_timesteps)

    def sigmas(self, num_steps: int) -> np.ndarray:
        """σ_0..σ_S, float32 [S+1] (last = 0)."""
        return np.concatenate([self._inference_sigmas(num_steps), np.zeros(1, np.float32)])

    def steps(self, num_steps: int) -> FlowMatchEulerSteps:
        sigmas = self.sigmas(num_steps)
        return FlowMatchEulerSteps(timestep=self.timesteps(num_steps), sigma=sigmas[:-1],
                                   dt=(sigmas[1:] - sigmas[:-1]).astype(np.float32))


SCHEDULES = {"UniPCMultistepScheduler": UniPCSchedule, "FlowMatchEulerDiscreteScheduler": FlowMatchEulerSchedule}


def schedule_from_config(config: Mapping[str, Any]) -> UniPCSchedule | FlowMatchEulerSchedule:
    """The flow schedule a checkpoint's scheduler_config.json names (`_class_name`)."""
    name = config.get("_class_name")
    if name not in SCHEDULES:
        raise ValueError(f"scheduler config: _class_name {name!r} is not a supported flow scheduler "
                         f"(use one of {sorted(SCHEDULES)})")
    return SCHEDULES[name].from_config(config)


def sample_loop(denoise_fn: Callable, latents, steps: UniPCSteps | FlowMatchEulerSteps,
                progress: Callable[[Any], None] | None = None, record: bool = False):
    """Run every step of `steps` from `latents` with `jax.lax.scan`; returns the final latents.

    denoise_fn(x, t, i) -> flow prediction (already guided), jittable; x has latents' dtype, t is the
    step's timestep (int32 for UniPC, float32 for Euler) and i the int32 step index. progress(i), if given,
    is called on the host once per step (an unordered jax.debug.callback). Wrap the caller in jax.jit to
    compile the whole loop with the model.

    record=True: denoise_fn returns (prediction, aux) and the result is (final, history) where history
    holds, stacked over steps, `pred_original_sample` (x̂0), `latents` (after each step), for UniPC
    `corrected_sample` (the sample after the corrector, which the predictor starts from), and aux's entries.
    """
    def body(carry, xs):
        x, state = carry
        i, step = xs
        pred = denoise_fn(x, step.timestep, i)
        pred, aux = pred if record else (pred, {})
        x_next, state, rec = step.update(x, state, pred)
        x_next = x_next.astype(x.dtype)  # the pipeline keeps latents in their own dtype between steps
        if progress is not None:
            jax.debug.callback(progress, i)
        return (x_next, state), ({**rec, "latents": x_next, **aux} if record else None)

    index = jnp.arange(len(steps), dtype=jnp.int32)
    (out, _), history = jax.lax.scan(body, (latents, steps.init(latents)), (index, steps))
    return (out, history) if record else out
