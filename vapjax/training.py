"""Training the VAP expert: objectives, the frozen-backbone optimizer, the sharded step, checkpoints.

The parameter tree splits into a *trainable* part (the `expert` and `lora` partitions, plus whatever a
config regex unfreezes) and a *frozen* part (the backbone). Gradients are taken with respect to the
trainable part only — the frozen part is a plain input of the step — and the optimizer state exists only for it, so the
backbone gets neither weight gradients nor optimizer memory and stays bit-identical.

Objectives (spec §7.3, §7.4) are functions of a `predict` callable, so one trainer serves CogVideoX's
v-prediction DDIM objective and Wan's flow matching.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from vapjax import conditioning, lora
from vapjax import tree as vtree
from vapjax.models.cogvideox_vae import Posterior

Array = jax.Array

# Official training never updates torch *buffers*; the expert's learned position table is one.
BUFFERS = ("pos_embedding",)
# Partitions that train by default: the VAP expert, and a LoRA (the single-branch LoRA ablation).
TRAINABLE_PARTITIONS = ("expert", "lora")


# ---------------------------------------------------------------------------------------------
# Which parameters train
# ---------------------------------------------------------------------------------------------

def is_trainable(path: vtree.Path, unfreeze: str = "") -> bool:
    """The expert and LoRA partitions (minus buffers), or anything matching the `unfreeze` regex."""
    if unfreeze and re.search(unfreeze, vtree.path_str(path)):
        return True
    return path[0] in TRAINABLE_PARTITIONS and path[-1] not in BUFFERS


def split_params(params: Mapping, unfreeze: str = "") -> tuple[dict, dict]:
    """(trainable, frozen) trees."""
    return vtree.partition(params, lambda p: is_trainable(p, unfreeze))


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def ddim_timestep_table(num_train_timesteps: int = 1000) -> np.ndarray:
    """t for each index of the official CogVideoX draw (UDIFF:86-121, CSPEC:602), built once on the host:
    σ = float32(T−1−idx) / T, t = ⌊σ·T⌋, both correctly rounded float32 operations as torch does them
    on CPU. Uniform over 0 … T−1 except that five values (511, 506, 502, 253, 251) map one lower.
    (XLA's float32 division is not correctly rounded, so computing this on device gives another set.)"""
    T = np.float32(num_train_timesteps)
    sigma = np.arange(num_train_timesteps - 1, -1, -1).astype(np.float32) / T
    return np.floor(sigma * T).astype(np.int32)


@functools.lru_cache(maxsize=None)
def flow_tables(num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(σ, t) for each index of Wan's draw, built once on the host: σ = float32(T − idx) / T (the flow
    scheduler's sigmas, FMS:117-132, shift 1), t = ⌊float32(σ)·T⌋ (σ = 1 → T; σ = 0.511 → 510)."""
    T = np.float32(num_train_timesteps)
    sigma = np.arange(num_train_timesteps, 0, -1).astype(np.float32) / T
    return sigma, np.floor(sigma * T).astype(np.int32)


def cogvideox_timesteps(rng: Array, batch: int, num_train_timesteps: int = 1000) -> Array:
    """The official draw: idx uniform on {0 … T−1}, t = the host table's entry (`ddim_timestep_table`)."""
    idx = jax.random.randint(rng, (batch,), 0, num_train_timesteps)
    return jnp.asarray(ddim_timestep_table(num_train_timesteps))[idx]


def flow_sigmas(rng: Array, batch: int, num_train_timesteps: int = 1000) -> tuple[Array, Array]:
    """Wan's logit-normal draw (UDIFF:49-74): u = sigmoid(N(0,1)), idx = ⌊u·T⌋, then (σ, t) from the
    host tables (`flow_tables`), so the objective sees exactly the official t for its σ."""
    u = jax.nn.sigmoid(jax.random.normal(rng, (batch,)))
    idx = jnp.minimum(jnp.floor(u * num_train_timesteps).astype(jnp.int32), num_train_timesteps - 1)
    sigma, t = flow_tables(num_train_timesteps)
    return jnp.asarray(sigma)[idx], jnp.asarray(t)[idx]


def cogvideox_sample_losses(predict: Callable[[Array, Array], Array], x0: Array, noise: Array, t: Array,
                            alphas_cumprod: np.ndarray) -> Array:
    """Per-sample v-prediction DDIM objective [B], exactly as the official trainer computes it (spec §7.3):
    x_t = √ᾱ x0 + √(1−ᾱ) ε;  x̂0 = √ᾱ x_t − √(1−ᾱ) v̂;  loss = mean(w (x̂0 − x0)²), w = 1/(1−ᾱ).
    Algebraically this is the plain v-MSE ‖v̂ − v‖² with v = √ᾱ ε − √(1−ᾱ) x0.
    `predict(x_t, t)` returns v̂ for the target. `alphas_cumprod` is the schedule's host table (float64):
    as in the scheduler, ᾱ is cast to the latents' dtype for x_t and x̂0, while w is computed in float64
    and then rounded to float32 (UDIFF:136-139) — at t = 0, 1−ᾱ ≈ 8.5e-4 and a float32 ᾱ would move w
    by up to 3.5e-5 relative."""
    ab = jnp.asarray(alphas_cumprod, x0.dtype)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
    sa, sb = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    x_t = sa * x0 + sb * noise
    v = predict(x_t, t).astype(jnp.float32)
    x0_hat = sa * x_t - sb * v
    weights = (1.0 / (1.0 - np.asarray(alphas_cumprod, np.float64))).astype(np.float32)
    w = jnp.asarray(weights)[t].reshape(ab.shape)
    return jnp.mean(w * jnp.square(x0_hat - x0), axis=tuple(range(1, x0.ndim)))


def cogvideox_loss(predict: Callable[[Array, Array], Array], x0: Array, noise: Array, t: Array,
                   alphas_cumprod: np.ndarray) -> Array:
    """The batch mean of `cogvideox_sample_losses`."""
    return jnp.mean(cogvideox_sample_losses(predict, x0, noise, t, alphas_cumprod))


def flow_matching_loss(predict: Callable[[Array, Array], Array], x0: Array, noise: Array, sigma: Array,
                       t: Array) -> Array:
    """Wan's objective (spec §7.4): x_t = (1−σ) x0 + σ ε, target ε − x0, unit weight; σ and its t come
    from `flow_sigmas`. The reference stream's timestep (1 for Wan) is the model's business."""
    s = sigma.astype(jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = (1 - s) * x0 + s * noise
    return jnp.mean(jnp.square(predict(x_t, t).astype(jnp.float32) - (noise - x0)))


def cogvideox_inputs(batch: Mapping[str, Array], rng: Array, scaling_factor: float, empty_text: Array,
                     caption_dropout: float, dtype) -> dict[str, Array]:
    """Model inputs from a precomputed batch (vapjax.data): fresh posterior draws × scaling factor for
    the target (`x0`) and, through `conditioning.cogvideox` (the pipeline's input contract), the image
    condition, the expert input and the captions. Caption dropout (spec §7.5) blanks the target caption
    and every reference caption of a sample together."""
    k = iter(jax.random.split(rng, 5))
    z = lambda d: (Posterior.from_concat(d.astype(jnp.float32)).sample(next(k)) * scaling_factor).astype(dtype)
    x0, image, ref_latents, ref_first = (z(batch[key]) for key in
                                         ("latent_dist", "image_dist", "ref_latent_dist", "ref_image_dist"))
    drop = jax.random.uniform(next(k), (x0.shape[0],)) < caption_dropout
    blank = lambda text: jnp.where(drop.reshape((-1,) + (1,) * (text.ndim - 1)), empty_text, text).astype(dtype)
    cond = conditioning.cogvideox(image, ref_latents, ref_first, blank(batch["text"]), blank(batch["ref_text"]))
    return dict(x0=x0, **cond)


def cogvideox_dpo_inputs(batch: Mapping[str, Array], rng: Array, scaling_factor: float, empty_text: Array,
                         caption_dropout: float, dtype) -> dict[str, Array]:
    """DPO model inputs (spec §7.8) for P pairs, as 2P samples ordered [win_0, lose_0, win_1, lose_1, …]:
    the targets' fields carry a pair axis (`latent_dist` [P, 2, …], `image_dist` [P, 2, …], `text`
    [P, 2, L, D]); the one reference of a pair (`ref_*` [P, N, …]) is drawn once and repeated to both of
    its samples, as the official trainer repeats the reference tensors; caption dropout blanks the win,
    lose and reference captions of a pair together (DS:1156-1158)."""
    p = batch["latent_dist"].shape[0]
    k = iter(jax.random.split(rng, 5))
    z = lambda d: (Posterior.from_concat(d.astype(jnp.float32)).sample(next(k)) * scaling_factor).astype(dtype)
    pairs = lambda a: a.reshape((2 * p,) + a.shape[2:])
    both = lambda a: jnp.repeat(a, 2, axis=0)
    x0, image = pairs(z(batch["latent_dist"])), pairs(z(batch["image_dist"]))
    ref_latents, ref_first = both(z(batch["ref_latent_dist"])), both(z(batch["ref_image_dist"]))
    drop = both(jax.random.uniform(next(k), (p,)) < caption_dropout)
    blank = lambda text: jnp.where(drop.reshape((-1,) + (1,) * (text.ndim - 1)), empty_text, text).astype(dtype)
    cond = conditioning.cogvideox(image, ref_latents, ref_first, blank(pairs(batch["text"])),
                                  blank(both(batch["ref_text"])))
    return dict(x0=x0, **cond)


def dpo_loss(policy: Array, reference: Array, pair_weight: Array, beta: float) -> tuple[Array, Array]:
    """(loss, implicit reward margin) of Diffusion-DPO (spec §7.8, TR:774-825) from per-sample losses
    [2P] ordered [win, lose, …] under the policy and the frozen reference:
    margin = −β/2·[(ℓ_w − ℓ_l) − (ℓ^ref_w − ℓ^ref_l)], loss = mean over pairs of −log σ(margin)·w_pair.
    The reference losses carry no gradient."""
    pol, ref = policy.reshape(-1, 2), jax.lax.stop_gradient(reference).reshape(-1, 2)
    margin = -0.5 * beta * ((pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1]))
    return jnp.mean(-jax.nn.log_sigmoid(margin) * pair_weight.astype(jnp.float32)), jnp.mean(margin)


def wan_inputs(batch: Mapping[str, Array], rng: Array, empty_text: Array, caption_dropout: float,
               dtype) -> dict[str, Array]:
    """Model inputs from a Wan batch (vapjax.data, spec §4.3, §8.9): x0 and the reference latents are fresh
    draws from posteriors whose mean AND log-variance the data path already normalised per channel (the
    official quirk; the draw clips the normalised log-variance to [−30, 20] as the official
    DiagonalGaussianDistribution does); the conditions are normalised posterior modes. Through
    `conditioning.wan` (the pipeline's input contract): [mask | condition] beside the noisy latents, the
    expert's [reference | mask | reference condition], captions and CLIP embeddings. Caption dropout
    (spec §7.5) blanks the target and the reference caption of a sample together. Wan takes exactly one
    reference: batches carry it on a reference axis of length 1, as the loader's."""
    n = batch["ref_latent_dist"].shape[1]
    if n != 1:
        raise ValueError(f"Wan-VAP trains with exactly one reference (the official model asserts it); "
                         f"the batch has {n} (set data.num_refs=1)")
    k = iter(jax.random.split(rng, 3))
    z = lambda d: Posterior.from_concat(d.astype(jnp.float32)).sample(next(k)).astype(dtype)
    x0, ref_latents = z(batch["latent_dist"]), z(batch["ref_latent_dist"][:, 0])
    drop = jax.random.uniform(next(k), (x0.shape[0],)) < caption_dropout
    blank = lambda text: jnp.where(drop.reshape((-1,) + (1,) * (text.ndim - 1)), empty_text, text).astype(dtype)
    cast = lambda key: batch[key].astype(dtype)
    cond = conditioning.wan(cast("condition"), ref_latents, batch["ref_condition"][:, 0].astype(dtype),
                            blank(batch["text"]), blank(batch["ref_text"][:, 0]), cast("image_embeds"),
                            batch["ref_image_embeds"][:, 0].astype(dtype))
    return dict(x0=x0, **cond)


def wan_predictor(model, params, cond: Mapping[str, Array], ref_t: int = 1) -> Callable[[Array, Array], Array]:
    """predict(x_t, t) -> the flow prediction: the model on [x_t | mask | condition] with the reference,
    captions and CLIP embeddings of `cond` (the output of `conditioning.wan`) and the expert at the fixed
    reference timestep `ref_t` (1 = ⌊0.001·1000⌋ in the official trainer and pipeline, spec §7.4)."""
    def predict(x_t, t):
        latents = jnp.concatenate([x_t, cond["condition"].astype(x_t.dtype)], axis=-1)
        return model.apply({"params": params}, latents, cond["text"], cond["image"], t, cond["ref_latents"],
                           cond["ref_text"], cond["ref_image"], ref_t)
    return predict


def cogvideox_predictor(model, params, cond: Mapping[str, Array]) -> Callable[[Array, Array], Array]:
    """predict(x_t, t) -> v̂: the model on [x_t | image condition] with the references of `cond`
    (the output of `conditioning.cogvideox`, and `ref_t` for a noisy reference)."""
    def predict(x_t, t):
        latents = jnp.concatenate([x_t, cond["image"].astype(x_t.dtype)], axis=-1)
        return model.apply({"params": params}, latents, cond["text"], t, cond["ref_latents"], cond["ref_text"],
                           ref_t=cond.get("ref_t"))
    return predict


def reference_timesteps(rng: Array, shape: tuple[int, ...], num_steps: int, num_train_timesteps: int = 1000) -> Array:
    """The official noisy-reference draw (TR:631-649): the DDIM draw restricted to the lowest `num_steps`
    timesteps (`num_ref_diffusion_time_sigmas`): idx uniform on {0 … K−1} over the table's last K entries,
    t = K−1 … 0 (with the table's five −1 quirks). K = 0 is the official default and quirk: the slice
    `sigmas[-0:]` is the whole table and idx is always 0, so t = 999."""
    table = ddim_timestep_table(num_train_timesteps)
    if num_steps <= 0:
        return jnp.full(shape, table[0], jnp.int32)
    idx = jax.random.randint(rng, shape, 0, num_steps)
    return jnp.asarray(table[num_train_timesteps - num_steps:])[idx]


def noisy_reference(cond: Mapping[str, Array], rng: Array, alphas_cumprod: np.ndarray, num_steps: int = 1000,
                    drive_adaln: bool = False) -> dict[str, Array]:
    """The official `reference_independent` mode (CSPEC:609-618, 731-734): each reference of each sample is
    noised to its own timestep t_ref (`reference_timesteps`: the lowest `num_steps`), x = √ᾱ x0 + √(1−ᾱ) ε
    on its clip channels (the first-frame condition stays clean). Returns the inputs with the noisy
    references, plus `ref_x0` (the clean clip channels, the reference loss's target) and `ref_noise_t`
    [B, N]. `drive_adaln` (official `random_refer_noise`): t_ref also drives the expert's adaLN (`ref_t`);
    our expert shares one embedding across references, so that needs one reference."""
    k_t, k_noise = jax.random.split(rng)
    ref, frames = cond["ref_latents"], cond["x0"].shape[1]
    b, nf, c = ref.shape[0], ref.shape[1], ref.shape[-1] // 2
    n = nf // frames
    t_ref = reference_timesteps(k_t, (b, n), num_steps, len(alphas_cumprod))
    ab = jnp.repeat(jnp.asarray(alphas_cumprod, ref.dtype)[t_ref], frames, axis=1).reshape((b, nf) + (1,) * (ref.ndim - 2))
    x0 = ref[..., :c]
    clip = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * jax.random.normal(k_noise, x0.shape, ref.dtype)
    out = {**cond, "ref_latents": jnp.concatenate([clip, ref[..., c:]], axis=-1), "ref_x0": x0, "ref_noise_t": t_ref}
    if drive_adaln:
        if n != 1:
            raise ValueError(f"ref_noise.adaln drives the expert's adaLN with the reference's timestep: it needs one "
                             f"reference, the batch has {n}")
        out["ref_t"] = t_ref[:, 0]
    return out


def reference_loss(v_ref: Array, cond: Mapping[str, Array], alphas_cumprod: np.ndarray, num_refs: int) -> Array:
    """The official reference loss (TR:742-767): per reference i, the §7.3 objective of the expert's
    prediction v̂ᵢ on its noisy clip — x̂0 = √ᾱ x_t − √(1−ᾱ) v̂ᵢ, w = 1/(1−ᾱ) at its t_ref, mean over its
    elements and the batch — times 0.6 / `num_refs` (the configured number of references), summed over i."""
    t_ref, x0 = cond["ref_noise_t"], cond["ref_x0"]
    b, n = t_ref.shape
    split = lambda a: a.reshape((b, n, -1) + a.shape[2:])
    x_t = split(cond["ref_latents"][..., :x0.shape[-1]])
    expand = lambda a: a.reshape((b, n) + (1,) * (x_t.ndim - 2))
    ab = expand(jnp.asarray(alphas_cumprod, x_t.dtype)[t_ref])
    x0_hat = jnp.sqrt(ab) * x_t - jnp.sqrt(1 - ab) * split(v_ref.astype(jnp.float32))
    w = expand(jnp.asarray((1.0 / (1.0 - np.asarray(alphas_cumprod, np.float64))).astype(np.float32))[t_ref])
    per_ref = jnp.mean(w * jnp.square(x0_hat - split(x0)), axis=tuple(range(2, x_t.ndim)))   # [B, N]
    return jnp.sum(jnp.mean(per_ref, axis=0)) * 0.6 / num_refs


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------

def learning_rate(cfg) -> optax.Schedule:
    """constant_with_warmup as the official trainer: lr · min(1, step / warmup); warmup 0: constant
    (the DPO scripts' "constant")."""
    lr, warmup = cfg.learning_rate, cfg.warmup_steps
    if warmup <= 0:
        return lambda step: jnp.full((), lr, jnp.float32)
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
                        dtype, ref_noise: bool = False, ref_noise_steps: int = 1000, ref_noise_adaln: bool = False,
                        num_refs: int = 1) -> Callable:
    """objective(params, batch, rng, empty_text) -> loss: CogVideoX-VAP on a precomputed batch
    (fresh posterior draws, official t draw, v-prediction loss on the target only). `ref_noise`: the
    official `reference_independent` mode — references noised to their own timesteps (`noisy_reference`),
    and the expert's head predicts them (a ref_head model) for `reference_loss`; returns (loss, {the
    target's and the reference's loss})."""
    alphas = np.asarray(alphas_cumprod, np.float64)

    def objective(params, batch, rng, empty_text):
        k_in, k_t, k_noise = jax.random.split(rng, 3)
        x = cogvideox_inputs(batch, k_in, scaling_factor, empty_text, caption_dropout, dtype)
        t = cogvideox_timesteps(k_t, x["x0"].shape[0], len(alphas))
        noise = jax.random.normal(k_noise, x["x0"].shape).astype(dtype)
        if not ref_noise:
            return cogvideox_loss(cogvideox_predictor(model, params, x), x["x0"], noise, t, alphas)
        # its own key: the default path's draws stay as they are
        x = noisy_reference(x, jax.random.fold_in(rng, 1), alphas, ref_noise_steps, ref_noise_adaln)
        seen = {}

        def predict(x_t, t_):
            latents = jnp.concatenate([x_t, x["image"].astype(x_t.dtype)], axis=-1)
            v, seen["ref"] = model.apply({"params": params}, latents, x["text"], t_, x["ref_latents"], x["ref_text"],
                                         ref_t=x.get("ref_t"), ref_output=True)
            return v

        target = cogvideox_loss(predict, x["x0"], noise, t, alphas)
        ref = reference_loss(seen["ref"], x, alphas, num_refs)
        return target + ref, {"loss_target": target, "loss_reference": ref}

    return objective


def cogvideox_dpo_objective(model, alphas_cumprod: np.ndarray, *, scaling_factor: float, caption_dropout: float,
                            dtype, beta: float = 500.0) -> Callable:
    """objective({'policy': params, 'reference': params}, batch, rng, empty_text) -> (loss, metrics): DPO on
    a batch of (win, lose) pairs (`cogvideox_dpo_inputs`): one t per pair, independent noise for win and
    lose, the §7.3 per-sample losses of the policy and of the frozen reference on the same x_t, then
    `dpo_loss` (official β 500). Metrics: the mean implicit reward margin and the policy's win/lose losses."""
    alphas = np.asarray(alphas_cumprod, np.float64)

    def objective(params, batch, rng, empty_text):
        k_in, k_t, k_noise = jax.random.split(rng, 3)
        x = cogvideox_dpo_inputs(batch, k_in, scaling_factor, empty_text, caption_dropout, dtype)
        t = jnp.repeat(cogvideox_timesteps(k_t, x["x0"].shape[0] // 2, len(alphas)), 2)
        noise = jax.random.normal(k_noise, x["x0"].shape).astype(dtype)
        losses = {name: cogvideox_sample_losses(cogvideox_predictor(model, p, x), x["x0"], noise, t, alphas)
                  for name, p in params.items()}
        loss, margin = dpo_loss(losses["policy"], losses["reference"], batch["pair_weight"], beta)
        pol = losses["policy"].reshape(-1, 2)
        return loss, {"reward_margin": margin, "loss_win": jnp.mean(pol[:, 0]), "loss_lose": jnp.mean(pol[:, 1])}

    return objective


def wan_objective(model, *, caption_dropout: float, dtype, num_train_timesteps: int = 1000,
                  ref_t: int = 1) -> Callable:
    """objective(params, batch, rng, empty_text) -> loss: Wan-VAP flow matching on a Wan batch (spec §7.4):
    fresh posterior draws, the official logit-normal (σ, t) draw, x_t = (1−σ) x0 + σ ε, target ε − x0,
    unit weights, float32 MSE on the target only; the reference is clean with timestep `ref_t`."""

    def objective(params, batch, rng, empty_text):
        k_in, k_t, k_noise = jax.random.split(rng, 3)
        x = wan_inputs(batch, k_in, empty_text, caption_dropout, dtype)
        sigma, t = flow_sigmas(k_t, x["x0"].shape[0], num_train_timesteps)
        noise = jax.random.normal(k_noise, x["x0"].shape).astype(dtype)
        return flow_matching_loss(wan_predictor(model, params, x, ref_t), x["x0"], noise, sigma, t)

    return objective


def master_cast(dtype) -> Callable[[Any], Any]:
    """fp32 master weights: the stored (float32) trainable tree -> the copy the model computes with
    (`dtype`, e.g. bf16), so the forward and backward are those of `dtype` weights while the optimizer's
    small updates accumulate in float32 (a bf16 weight drops an update below half its spacing)."""
    dt = jnp.dtype(dtype)
    return lambda tree: jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def make_train_step(objective: Callable, tx: optax.GradientTransformation, lr: optax.Schedule,
                    combine: Callable[[Any, Any], Any] = vtree.merge,
                    cast: Callable[[Any], Any] | None = None) -> Callable:
    """train_step(state, frozen, batch, rng, empty_text) -> (state, metrics) for any
    objective(params, batch, rng, empty_text) -> loss or (loss, {name: scalar}) (`cogvideox_objective`,
    `wan_objective`, `dpo_objective`). The objective's params are `combine(trainable, frozen)`: the union of
    the two trees (default), or e.g. LoRA factors beside the frozen weights (`lora_combine`).
    Gradients flow only into `state.params`; `frozen` is a plain input. `cast` (`master_cast`): the
    stored params are float32 masters, the objective sees `cast(params)` and the gradients are taken
    with respect to that copy (in its dtype, as without masters); the optimizer updates the masters.
    Randomness is folded from (rng, step), so a resumed run draws what an uninterrupted one would."""

    def loss_fn(trainable, frozen, batch, rng, empty_text):
        out = objective(combine(trainable, frozen), batch, rng, empty_text)
        return out if isinstance(out, tuple) else (out, {})

    def train_step(state: TrainState, frozen, batch, rng, empty_text):
        rng = jax.random.fold_in(rng, state.step)
        compute = state.params if cast is None else cast(state.params)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(compute, frozen, batch, rng, empty_text)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr(state.step), **aux}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def lora_combine(alpha: float) -> Callable[[Any, Any], Any]:
    """combine(factors, frozen) for LoRA training: every frozen weight, the factors beside their kernels
    (`lora.attach`: the layers add (α/r)·(x·A)·B to x·W; no merged weights, no full-size ΔW)."""
    return lambda factors, frozen: lora.attach(frozen, factors, alpha)


def dpo_combine(alpha: float) -> Callable[[Any, Any], dict]:
    """combine(factors, frozen) for DPO: the policy (LoRA attached) and the reference (LoRA off) — the same
    frozen weights, no second copy."""
    return lambda factors, frozen: {"policy": lora.attach(frozen, factors, alpha), "reference": frozen}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed (one-line message)."""


# What orbax raises for a damaged step folder: a missing item (KeyError), corrupt JSON or array files
# (json / tensorstore ValueError), missing files (OSError). Anything else is a bug and propagates.
UNREADABLE = (OSError, ValueError, KeyError)


def describe_state(state: Any) -> dict[str, str]:
    """{leaf path: 'dtype[shape]'} of a (possibly abstract) state tree, in tree order."""
    def key(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    return {"/".join(key(k) for k in path): f"{jnp.dtype(a.dtype).name}{list(a.shape)}"
            for path, a in jax.tree_util.tree_flatten_with_path(state)[0]}


def signature_difference(saved: Mapping, current: Mapping) -> str | None:
    """The first difference between two checkpoint signatures ({model: config, state: describe_state}),
    in words (plus how many more there are), or None."""
    show = lambda v: v if isinstance(v, str) else json.dumps(v)
    diffs = []
    for section, label in (("model", "model config field "), ("state", "")):
        a, b = saved.get(section, {}), current[section]
        for k in list(b) + [k for k in a if k not in b]:
            if k not in a:
                diffs.append(f"{label}{k} is not in the checkpoint")
            elif k not in b:
                diffs.append(f"{label}{k} is in the checkpoint but not in this run")
            elif a[k] != b[k]:
                diffs.append(f"{label}{k} is {show(a[k])} in the checkpoint, {show(b[k])} in this run")
    if not diffs:
        return None
    return diffs[0] + (f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else "")


class TrainCheckpoints:
    """Training-state checkpoints (not to be confused with `vapjax.checkpoint`, the converted weights):
    an orbax CheckpointManager over {state: trainable params + optimizer state + step, data: the data
    iterator's state, config: the run's config, signature: what a resume must match}. The frozen
    backbone is not saved: the config names the converted checkpoint it came from.

    Saves are atomic (orbax commits a step by renaming a finished temporary folder), so a kill mid-save
    leaves the previous steps intact; a committed but unreadable (corrupt) step is skipped for the one
    before. A readable step that does not fit this run (other model config, expert layers, parameter
    shapes or dtypes) stops the run with a one-line error, as does a workdir whose steps are all
    unreadable: training never silently restarts from step 0 where later steps exist.

    `model`: the model config a resume must match (JSON-able dict)."""

    def __init__(self, directory: str, *, every: int, keep: int, model: Mapping, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.model = json.loads(json.dumps(dict(model)))

    def _signature(self, state: Any) -> dict:
        return {"model": self.model, "state": describe_state(state)}

    def save(self, step: int, state: TrainState, data_state: Any, config: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(config),
                                  signature=ocp.args.JsonSave(self._signature(state)))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: TrainState) -> tuple[int, TrainState, Any] | None:
        """(step, state, data_state) of the newest readable checkpoint, or None if there is none.
        Each step's signature is compared with this run's before its state is read."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        want = self._signature(abstract_state)
        for step in steps:
            try:
                saved = self.manager.restore(step, args=ocp.args.Composite(signature=ocp.args.JsonRestore()))
            except UNREADABLE as e:
                _unreadable(step, e)
                continue
            diff = signature_difference(saved["signature"], want)
            if diff:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} does not fit this run: {diff}; "
                                      "resume with the run's original config or use another workdir")
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except UNREADABLE as e:
                _unreadable(step, e)
                continue
            return step, got["state"], got["data"]
        if steps:
            raise CheckpointError(f"no readable checkpoint among steps {steps} in {self.directory}; refusing to "
                                  "start again from step 0 over them (move the folder away to start afresh)")
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _unreadable(step: int, e: Exception) -> None:
    logging.warning("checkpoint step %d unreadable (%s: %s); trying an older one",
                    step, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
