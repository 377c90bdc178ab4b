"""CogVideoX DDIM sampling (CogVideoXDDIMScheduler with eta=0) and classifier-free guidance.

Host side, numpy, computed once: the noise schedule, inference timesteps, per-step DDIM coefficients
(`DDIMSchedule`) and the dynamic-CFG scales (`dynamic_cfg_scale`). Device side, jittable: `ddim_step`,
`guide`, `sample_loop`, `DDIMSchedule.add_noise` / `DDIMSchedule.velocity`.

Why the coefficients are float32 arrays: the reference multiplies float32 latents by float64 0-dim
tensors, which do not promote, so torch rounds each coefficient to float32 and multiplies in float32.
Computing the coefficients in float64 on the host and rounding them once reproduces that. The jitted
step then matches torch bit for bit, except that XLA may fuse a·x + b·y into one fused multiply-add
(an ulp apart; none with XLA_FLAGS=--xla_cpu_max_isa=AVX, see tests/test_sampling.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vapjax.numerics import torch_linspace

PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
BETA_SCHEDULES = ("scaled_linear", "linear")

# CogVideoXDDIMScheduler's constructor defaults: a partial config means what it means to diffusers.
_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
    timestep_spacing="leading", rescale_betas_zero_snr=False, snr_shift_scale=3.0,
)
# Accepted and ignored: the CogVideoX step never clips or thresholds the x0 prediction.
_IGNORED = ("clip_sample", "clip_sample_range", "sample_max_value")


def _alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
    """ᾱ_t for t = 0..T−1, in the dtype diffusers uses (float64 for scaled_linear, float32 for linear)."""
    n = cfg["num_train_timesteps"]
    if cfg["beta_schedule"] == "scaled_linear":
        betas = torch_linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, np.float64) ** 2
    else:
        betas = torch_linspace(cfg["beta_start"], cfg["beta_end"], n, np.float32)
    ab = np.cumprod(1 - betas, dtype=np.float64).astype(betas.dtype)  # torch accumulates in float64
    s = cfg["snr_shift_scale"]
    ab = ab / (s + (1 - s) * ab)
    if cfg["rescale_betas_zero_snr"]:
        ab = _rescale_zero_terminal_snr(ab)
    return ab


def _rescale_zero_terminal_snr(ab: np.ndarray) -> np.ndarray:
    """Shift and scale √ᾱ so that √ᾱ_0 is kept and √ᾱ_{T−1} becomes 0 (Lin et al. 2023, Algorithm 1)."""
    root = np.sqrt(ab)  # correctly rounded; torch's CPU sqrt may be an ulp off (~1e-16 in ᾱ)
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    return root * root


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDIMSteps:
    """Per-step constants of one sampling run, leading axis = step; a pytree for `jax.lax.scan`.

    Coefficients are float32 roundings of float64 host values (see the module docstring).
    """
    timestep: Any              # int32 [S]: t fed to the model
    sqrt_alpha: Any            # float32 [S]: √ᾱ_t
    sqrt_one_minus_alpha: Any  # float32 [S]: √(1−ᾱ_t)
    a: Any                     # float32 [S]: weight of x_t in x_prev = a·x_t + b·x̂0
    b: Any                     # float32 [S]: weight of x̂0
    prediction_type: str = dataclasses.field(metadata=dict(static=True))  # static: selects the x̂0 formula

    def __len__(self) -> int:
        return len(self.timestep)


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """The CogVideoXDDIMScheduler noise schedule; build it with `DDIMSchedule.from_config`."""
    # ᾱ_t, [T], read-only; float64 (float32 for beta_schedule="linear", as diffusers computes it)
    alphas_cumprod: np.ndarray = dataclasses.field(repr=False)
    final_alpha_cumprod: float   # ᾱ used after the last step (prev timestep < 0)
    prediction_type: str
    timestep_spacing: str
    steps_offset: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DDIMSchedule:
        """From a diffusers scheduler_config.json dict; unsupported options raise a one-line ValueError."""
        cls_name = config.get("_class_name", "CogVideoXDDIMScheduler")
        if cls_name != "CogVideoXDDIMScheduler":
            raise ValueError(f"scheduler config: expected _class_name CogVideoXDDIMScheduler, got {cls_name}")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS and k not in _IGNORED)
        if unknown:
            raise ValueError(f"scheduler config: unsupported option(s) {', '.join(unknown)}")
        cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
        for key, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                             ("timestep_spacing", TIMESTEP_SPACINGS)):
            if cfg[key] not in allowed:
                raise ValueError(f"scheduler config: {key}={cfg[key]!r} is not supported (use one of {allowed})")
        if cfg["trained_betas"] is not None:
            raise ValueError("scheduler config: trained_betas is not supported")
        if not (isinstance(cfg["num_train_timesteps"], int) and cfg["num_train_timesteps"] > 1):
            raise ValueError(f"scheduler config: num_train_timesteps must be an int > 1, got "
                             f"{cfg['num_train_timesteps']!r}")
        ab = _alphas_cumprod(cfg)
        ab.setflags(write=False)
        return cls(alphas_cumprod=ab,
                   final_alpha_cumprod=1.0 if cfg["set_alpha_to_one"] else float(ab[0]),
                   prediction_type=cfg["prediction_type"], timestep_spacing=cfg["timestep_spacing"],
                   steps_offset=int(cfg["steps_offset"]))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """Inference timesteps (int64, descending) as CogVideoXDDIMScheduler.set_timesteps spaces them."""
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in 1..{T}, got {num_steps}")
        if self.timestep_spacing == "trailing":
            return np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        if self.timestep_spacing == "leading":
            return (np.arange(num_steps) * (T // num_steps))[::-1].astype(np.int64) + self.steps_offset
        return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)

    def steps(self, num_steps: int) -> DDIMSteps:
        """Host-computed constants for `num_steps` DDIM steps (eta = 0)."""
        t = self.timesteps(num_steps)
        ab = self.alphas_cumprod
        # The step goes back by T // S even where the spacing is not an exact multiple (as the reference).
        prev = t - self.num_train_timesteps // num_steps
        ab_t = ab[t]
        ab_prev = np.where(prev >= 0, ab[np.maximum(prev, 0)], ab.dtype.type(self.final_alpha_cumprod))
        a = np.sqrt((1 - ab_prev) / (1 - ab_t))
        b = np.sqrt(ab_prev) - np.sqrt(ab_t) * a
        f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
        return DDIMSteps(timestep=t.astype(np.int32), sqrt_alpha=f32(np.sqrt(ab_t)),
                         sqrt_one_minus_alpha=f32(np.sqrt(1 - ab_t)), a=f32(a), b=f32(b),
                         prediction_type=self.prediction_type)

    def _noise_coefs(self, t, x):
        """√ᾱ_t and √(1−ᾱ_t) broadcastable against x, for t a scalar or one timestep per batch row.

        ᾱ is rounded to x's dtype before the square roots, as diffusers' add_noise / get_velocity do.
        """
        ab = jnp.asarray(self.alphas_cumprod, x.dtype)[jnp.asarray(t)]
        ab = ab.reshape(ab.shape + (1,) * (x.ndim - ab.ndim))
        return jnp.sqrt(ab), jnp.sqrt(1 - ab)

    def add_noise(self, x0, noise, t):
        """Forward diffusion x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        sa, sb = self._noise_coefs(t, x0)
        return sa * x0 + sb * noise

    def velocity(self, x0, noise, t):
        """The v-prediction target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0."""
        sa, sb = self._noise_coefs(t, x0)
        return sa * noise - sb * x0


def _scale(c, x):
    """c·x as torch multiplies a tensor by a scalar: c is cast to x's dtype (type promotion), the product
    is taken in float32 and rounded to x's dtype. With the official bf16 latents this rounds the DDIM
    coefficients to bf16 too; for float32 it is a plain float32 product."""
    c = jnp.asarray(c, jnp.float32).astype(x.dtype).astype(jnp.float32)
    return (c * x.astype(jnp.float32)).astype(x.dtype)


def predict_x0(step: DDIMSteps, x, model_output):
    """The clean-sample prediction x̂0 at one step (`step` holds scalars: one slice of a DDIMSteps)."""
    if step.prediction_type == "v_prediction":
        return _scale(step.sqrt_alpha, x) - _scale(step.sqrt_one_minus_alpha, model_output)
    if step.prediction_type == "epsilon":
        return (x - _scale(step.sqrt_one_minus_alpha, model_output)) / step.sqrt_alpha
    return model_output


def ddim_step(step: DDIMSteps, x, model_output):
    """One deterministic DDIM update; returns (x_prev, x̂0). The result is float32 unless both inputs are
    lower precision (as in torch); `sample_loop` casts it back to the latents' dtype like the pipeline."""
    x0 = predict_x0(step, x, model_output)
    return _scale(step.a, x) + _scale(step.b, x0), x0


def guide(uncond, cond, scale):
    """Classifier-free guidance u + g·(c − u); g (a host float64) is rounded to the predictions' dtype
    (float32) as torch does with a Python float."""
    return uncond + _scale(scale, cond - uncond)


def dynamic_cfg_scale(guidance: float, t: int, num_steps: int) -> float:
    """CogVideoX's dynamic CFG scale at raw timestep t, in Python float64 exactly as the reference.

    Mixing t ∈ 0..T−1 with S = num_steps is the official quirk: ((S − t)/S)^5 is hugely negative and the
    result is a pseudo-random value in [1, 1 + g] (table in spec §5.1). Keep it for parity.
    """
    t = int(t)
    return 1 + guidance * ((1 - math.cos(math.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2)


def sample_loop(denoise_fn: Callable, latents, steps: DDIMSteps, dtype=None,
                progress: Callable[[Any], None] | None = None, record: bool = False):
    """Run every DDIM step of `steps` from `latents` with `jax.lax.scan`; returns the final latents.

    denoise_fn(x, t, i) -> model prediction of the schedule's type (already guided), jittable; x has
    the latents' dtype, t is the int32 timestep and i the int32 step index (e.g. to pick a per-step CFG
    scale). `dtype` (default: the given latents' own) is the dtype the latents are kept in: they are
    cast to it before the first step and after every step, as the pipeline casts them to its compute
    dtype (CPIPE:1057). progress(i), if given, is called on the host once per step (an unordered
    jax.debug.callback, so it also works on sharded computations), e.g. to advance a progress bar.
    Wrap the caller in jax.jit to compile the whole loop with the model.

    record=True: denoise_fn returns (prediction, aux) and the result is (final, history) where history
    holds, stacked over steps, `pred_original_sample`, `latents` (after each step) and aux's entries.
    """
    dtype = jnp.dtype(dtype or latents.dtype)

    def body(x, xs):
        i, step = xs
        pred = denoise_fn(x, step.timestep, i)
        pred, aux = pred if record else (pred, {})
        x_prev, x0 = ddim_step(step, x, pred)
        x_prev = x_prev.astype(dtype)
        if progress is not None:
            jax.debug.callback(progress, i)
        return x_prev, ({"pred_original_sample": x0, "latents": x_prev, **aux} if record else None)

    index = jnp.arange(len(steps), dtype=jnp.int32)
    out, history = jax.lax.scan(body, jnp.asarray(latents).astype(dtype), (index, steps))
    return (out, history) if record else out
