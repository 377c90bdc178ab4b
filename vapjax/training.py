"""Training the VAP expert: objectives, the frozen-backbone optimizer, the sharded step, checkpoints.

The parameter tree splits into a *trainable* part (the `expert` partition, plus whatever a config regex
unfreezes) and a *frozen* part (the backbone). Gradients are taken with respect to the trainable part
only — the frozen part is a plain input of the step — and the optimizer state exists only for it, so the
backbone gets neither weight gradients nor optimizer memory and stays bit-identical.

Objectives (spec §7.3, §7.4) are functions of a `predict` callable, so one trainer serves CogVideoX's
v-prediction DDIM objective and Wan's flow matching.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from vapjax import tree as vtree

Array = jax.Array

# Official training never updates torch *buffers*; the expert's learned position table is one.
BUFFERS = ("pos_embedding",)


# ---------------------------------------------------------------------------------------------
# Which parameters train
# ---------------------------------------------------------------------------------------------

def is_trainable(path: vtree.Path, unfreeze: str = "") -> bool:
    """The expert partition (minus buffers), or anything matching the `unfreeze` regex."""
    if unfreeze and re.search(unfreeze, vtree.path_str(path)):
        return True
    return path[0] == "expert" and path[-1] not in BUFFERS


def split_params(params: Mapping, unfreeze: str = "") -> tuple[dict, dict]:
    """(trainable, frozen) trees."""
    return vtree.partition(params, lambda p: is_trainable(p, unfreeze))


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------

def posterior_sample(dist: Array, rng: Array) -> Array:
    """A VAE posterior draw from [..., 2C] = mean ‖ logvar (logvar clipped to [−30, 20] as diffusers)."""
    mean, logvar = jnp.split(dist.astype(jnp.float32), 2, axis=-1)
    return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(rng, mean.shape)


def cogvideox_timesteps(rng: Array, batch: int, num_train_timesteps: int = 1000) -> Array:
    """The official draw (UDIFF:86-121): u ~ U[0,1), idx = ⌊u·T⌋, σ = timesteps[idx]/T with
    timesteps = T−1 … 0, t = ⌊σ·T⌋ in float32 — uniform on {0 … T−1} except that the float32 round
    trip maps five values (e.g. 511) one lower."""
    T = num_train_timesteps
    idx = jnp.floor(jax.random.uniform(rng, (batch,)) * T).astype(jnp.int32)
    sigma = (T - 1 - idx).astype(jnp.float32) / jnp.float32(T)
    return jnp.floor(sigma * jnp.float32(T)).astype(jnp.int32)


def flow_sigmas(rng: Array, batch: int, num_train_timesteps: int = 1000) -> Array:
    """Wan's logit-normal σ (UDIFF:49-74): u = sigmoid(N(0,1)), idx = ⌊u·T⌋, σ = (T − idx)/T."""
    T = num_train_timesteps
    u = jax.nn.sigmoid(jax.random.normal(rng, (batch,)))
    idx = jnp.floor(u * T)
    return (T - idx) / T


def cogvideox_loss(predict: Callable[[Array, Array], Array], x0: Array, noise: Array, t: Array,
                   alphas_cumprod: Array) -> Array:
    """v-prediction DDIM objective exactly as the official trainer computes it (spec §7.3):
    x_t = √ᾱ x0 + √(1−ᾱ) ε;  x̂0 = √ᾱ x_t − √(1−ᾱ) v̂;  loss = mean(w (x̂0 − x0)²), w = 1/(1−ᾱ).
    Algebraically this is the plain v-MSE ‖v̂ − v‖² with v = √ᾱ ε − √(1−ᾱ) x0.
    `predict(x_t, t)` returns v̂ for the target."""
    ab = alphas_cumprod[t].astype(x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
    sa, sb = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    x_t = sa * x0 + sb * noise
    v = predict(x_t, t).astype(jnp.float32)
    x0_hat = sa * x_t - sb * v
    w = 1.0 / (1.0 - ab.astype(jnp.float32))
    per_sample = jnp.mean(w * jnp.square(x0_hat - x0), axis=tuple(range(1, x0.ndim)))
    return jnp.mean(per_sample)


def flow_matching_loss(predict: Callable[[Array, Array], Array], x0: Array, noise: Array, sigma: Array,
                       num_train_timesteps: int = 1000) -> Array:
    """Wan's objective (spec §7.4): x_t = (1−σ) x0 + σ ε, target ε − x0, t = ⌊σ·T⌋ (float32), unit weight.
    The reference stream's timestep (1 for Wan) is the model's business, not the objective's."""
    s = sigma.astype(jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = (1 - s) * x0 + s * noise
    t = jnp.floor(sigma.astype(jnp.float32) * num_train_timesteps)
    return jnp.mean(jnp.square(predict(x_t, t).astype(jnp.float32) - (noise - x0)))


def cogvideox_inputs(batch: Mapping[str, Array], rng: Array, scaling_factor: float, empty_text: Array,
                     caption_dropout: float, dtype) -> dict[str, Array]:
    """Model inputs from a precomputed batch (vapjax.data): fresh posterior draws ×scaling factor,
    first-frame conditions zero-padded to the clip length, references concatenated on frames (expert
    input [ref latents | ref first-frame latents]) and on the caption axis, and caption dropout that
    blanks the target caption and every reference caption of a sample together (spec §7.5)."""
    k = iter(jax.random.split(rng, 5))
    b, f = batch["latent_dist"].shape[:2]
    n = batch["ref_latent_dist"].shape[1]
    z = lambda d: (posterior_sample(d, next(k)) * scaling_factor).astype(dtype)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, f - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    x0 = z(batch["latent_dist"])
    image = pad(z(batch["image_dist"]))
    ref = z(batch["ref_latent_dist"].reshape((b * n,) + batch["ref_latent_dist"].shape[2:]))
    ref_image = pad(z(batch["ref_image_dist"].reshape((b * n,) + batch["ref_image_dist"].shape[2:])))
    ref_input = jnp.concatenate([ref, ref_image], -1).reshape((b, n * f) + ref.shape[2:-1] + (-1,))
    drop = jax.random.uniform(next(k), (b, 1, 1)) < caption_dropout
    text = jnp.where(drop, empty_text[None], batch["text"]).astype(dtype)
    ref_text = jnp.where(drop[:, None], empty_text[None, None], batch["ref_text"]).astype(dtype)
    return dict(x0=x0, image=image, ref_input=ref_input, text=text,
                ref_text=ref_text.reshape(b, n * ref_text.shape[2], -1))


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------

def learning_rate(cfg) -> optax.Schedule:
    """constant_with_warmup as the official trainer: lr · min(1, step / warmup)."""
    lr, warmup = cfg.learning_rate, max(1, cfg.warmup_steps)
    return lambda step: lr * jnp.minimum(1.0, step / warmup)


def fp32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `tx` on float32 copies of (low-precision) params and grads: fp32 moments for bf16 weights."""
    up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)

    def update(grads, state, params=None):
        return tx.update(up(grads), state, None if params is None else up(params))

    return optax.GradientTransformation(lambda params: tx.init(up(params)), update)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (official β (0.9, 0.99), ε 1e-8, weight decay 1e-4) after clipping the global gradient
    norm (1.0); optional fp32 moments and gradient accumulation."""
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
    if cfg.fp32_moments:
        tx = fp32_state(tx)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: Array
    params: Any        # trainable parameters only
    opt_state: Any


def init_state(trainable: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable))


def cogvideox_objective(model, alphas_cumprod: np.ndarray, *, scaling_factor: float, caption_dropout: float,
                        dtype) -> Callable:
    """objective(params, batch, rng, empty_text) -> loss: CogVideoX-VAP on a precomputed batch
    (fresh posterior draws, official t draw, v-prediction loss on the target only)."""
    alphas = jnp.asarray(alphas_cumprod, jnp.float32)

    def objective(params, batch, rng, empty_text):
        k_in, k_t, k_noise = jax.random.split(rng, 3)
        x = cogvideox_inputs(batch, k_in, scaling_factor, empty_text, caption_dropout, dtype)
        t = cogvideox_timesteps(k_t, x["x0"].shape[0], len(alphas))
        noise = jax.random.normal(k_noise, x["x0"].shape).astype(dtype)

        def predict(x_t, t):
            latents = jnp.concatenate([x_t, x["image"]], axis=-1)
            return model.apply({"params": params}, latents, x["text"], t, x["ref_input"], x["ref_text"])

        return cogvideox_loss(predict, x["x0"], noise, t, alphas)

    return objective


def make_train_step(objective: Callable, tx: optax.GradientTransformation, lr: optax.Schedule) -> Callable:
    """train_step(state, frozen, batch, rng, empty_text) -> (state, metrics) for any
    objective(params, batch, rng, empty_text) -> loss (e.g. `cogvideox_objective`; a Wan objective would
    wrap `flow_matching_loss` the same way). Gradients flow only into `state.params`; `frozen` is a plain
    input. Randomness is folded from (rng, step), so a resumed run draws what an uninterrupted one would."""

    def loss_fn(trainable, frozen, batch, rng, empty_text):
        return objective(vtree.merge(trainable, frozen), batch, rng, empty_text)

    def train_step(state: TrainState, frozen, batch, rng, empty_text):
        rng = jax.random.fold_in(rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, batch, rng, empty_text)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

class Checkpoints:
    """Orbax CheckpointManager over {state: trainable params + optimizer state + step, data: the
    data iterator's state, config}. The frozen backbone is not saved: the config names the converted
    checkpoint it came from. Saves are atomic (orbax commits a step by renaming a finished temporary
    folder), so a kill mid-save leaves the previous steps intact; a complete-looking but unreadable
    latest step is skipped for the one before."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, state: TrainState, data_state: Any, config: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(config))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: TrainState) -> tuple[int, TrainState, Any] | None:
        """(step, state, data_state) of the newest readable checkpoint, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
                return step, got["state"], got["data"]
            except Exception as e:  # noqa: BLE001 — orbax/tensorstore raise many types for a bad folder
                logging.warning("checkpoint step %d unreadable (%s: %s); trying an older one",
                                step, type(e).__name__, str(e).splitlines()[0][:200])
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
