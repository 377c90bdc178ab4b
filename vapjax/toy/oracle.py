"""The VAP-Toy oracle: reads which condition a clip shows.

A small 3D CNN trained on ground-truth clips of every condition (seen and unseen: it is the measuring
instrument, not a model under test) on training-split scenes, and checked on held-out scenes. It sees
each clip at half resolution as [frame, frame − first frame] and is trained on blurred, noised and
colour-jittered copies, so that it reads a generated clip (a VAE decode, softer than ground truth) the
same way. Its weights ship beside the toy model (`assets/toy/oracle.npz`).
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vapjax.toy import world

LABELS = tuple(world.CONDITIONS)


class OracleNet(nn.Module):
    """[B, F, H/2, W/2, 6] -> logits over LABELS. Time is folded into channels (a clip is 9 frames), so
    every layer is a 2D convolution: cheap on a CPU, and each filter sees the whole clip at once."""
    widths: Sequence[int] = (48, 64, 96)

    @nn.compact
    def __call__(self, x):
        b, f, h, w, c = x.shape
        x = x.transpose(0, 2, 3, 1, 4).reshape(b, h, w, f * c)
        for width in self.widths:
            x = nn.gelu(nn.Conv(width, (3, 3), strides=2, padding="SAME")(x))
        x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        x = nn.gelu(nn.Dense(128)(x))
        return nn.Dense(len(LABELS))(x)


def features(clips) -> jax.Array:
    """uint8 or [0, 1] clips [B, F, H, W, 3] -> [B, F, H/2, W/2, 6] (2×2 average; the frame and its
    difference from the first frame)."""
    x = jnp.asarray(clips)
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    b, f, h, w, c = x.shape
    x = x.reshape(b, f, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5))
    return jnp.concatenate([x * 2 - 1, (x - x[:, :1]) * 4], axis=-1)


def _augment(rng, x):
    """Blur (σ up to 1.2 px), noise and brightness/contrast jitter on [B, F, H, W, 3] in [0, 1]."""
    kb, kn, kc, ks = jax.random.split(rng, 4)
    b = x.shape[0]
    sigma = jax.random.uniform(kb, (b,), minval=0.01, maxval=1.2)
    taps = jnp.arange(-2, 3, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    k = k / k.sum(-1, keepdims=True)                                   # [B, 5]
    pad = jnp.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    h, w = x.shape[2:4]
    x = sum(k[:, i, None, None, None, None] * pad[:, :, i:i + h, 2:2 + w] for i in range(5))
    pad = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (2, 2), (0, 0)), mode="edge")
    x = sum(k[:, i, None, None, None, None] * pad[:, :, :, i:i + w] for i in range(5))
    noise = jax.random.normal(kn, x.shape) * jax.random.uniform(ks, (b, 1, 1, 1, 1), maxval=0.04)
    gain, shift = jax.random.uniform(kc, (2, b, 1, 1, 1, 1), minval=-0.1, maxval=0.1)
    return jnp.clip((x - 0.5) * (1 + gain) + 0.5 + shift + noise, 0, 1)


def _dataset(n: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """n ground-truth clips (conditions cycling over LABELS) on scenes of `split` ("train"/"heldout")."""
    rng = np.random.default_rng(seed)
    clips = np.empty((n, world.FRAMES, world.HEIGHT, world.WIDTH, 3), np.uint8)
    labels = np.arange(n) % len(LABELS)
    for i in range(n):
        clips[i] = world.render(world.sample_scene(rng, split), LABELS[labels[i]], seed=int(rng.integers(2 ** 31)))
    return clips, labels.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(net, params, clips):
    return net.apply({"params": params}, features(clips))


class Oracle:
    """`Oracle.load(path).read(clips)` -> the condition name of each clip."""

    def __init__(self, params):
        self.params, self.net = params, OracleNet()

    @classmethod
    def load(cls, path: str) -> "Oracle":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no oracle weights (python -m vapjax.toy.build trains them)")
        flat = dict(np.load(path))
        tree: dict = {}
        for key, value in flat.items():
            node = tree
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = jnp.asarray(value)
        return cls(tree)

    def save(self, path: str) -> None:
        flat = {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
                for kp, v in jax.tree_util.tree_flatten_with_path(self.params)[0]}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(path, **flat)

    def probabilities(self, clips, batch: int = 32) -> np.ndarray:
        out = [jax.nn.softmax(_logits(self.net, self.params, clips[i:i + batch]))
               for i in range(0, len(clips), batch)]
        return np.concatenate([np.asarray(o) for o in out])

    def read(self, clips) -> list[str]:
        """Condition names of clips [B, F, H, W, 3] (uint8, or floats in [0, 1]) at the toy size."""
        return [LABELS[i] for i in self.probabilities(clips).argmax(-1)]


def train(*, steps: int = 1500, batch: int = 48, train_clips: int = 4400, test_clips: int = 660, seed: int = 0,
          roundtrip: Callable[[np.ndarray], np.ndarray] | None = None, roundtrip_clips: int = 0,
          log=print, writer=None) -> tuple[Oracle, dict]:
    """Trains the oracle on ground-truth clips of training scenes; returns it and its accuracy on
    held-out scenes (clean, augmented, and through `roundtrip` if given). `roundtrip(clips) -> clips`
    (the VAE's encode and decode) adds `roundtrip_clips` decoded copies to the training set, so that the
    oracle reads the model's outputs as it reads ground truth."""
    t0 = time.time()
    x_train, y_train = _dataset(train_clips, seed, "train")
    x_test, y_test = _dataset(test_clips, seed + 1, "heldout")
    if roundtrip is not None and roundtrip_clips:
        x_train = np.concatenate([x_train, roundtrip(x_train[:roundtrip_clips])])
        y_train = np.concatenate([y_train, y_train[:roundtrip_clips]])
    log(f"oracle: {len(x_train)}+{test_clips} clips in {time.time() - t0:.0f}s")
    net = OracleNet()
    params = net.init(jax.random.PRNGKey(seed), features(x_train[:1]))["params"]
    sched = optax.warmup_cosine_decay_schedule(0, 2e-3, min(100, steps // 4), max(steps, 2), 1e-5)
    tx = optax.adamw(sched, weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, clips, labels, rng):
        def loss_fn(p):
            x = _augment(rng, clips.astype(jnp.float32) / 255.0)
            logits = net.apply({"params": p}, features(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.integers(0, len(x_train), batch)
        params, opt, loss = step(params, opt, x_train[idx], y_train[idx], jax.random.PRNGKey(i))
        if i % 100 == 0 or i == steps - 1:
            log(f"oracle step {i}: loss {float(loss):.4f} ({time.time() - t0:.0f}s)")
            if writer is not None:
                writer.add_scalar("oracle/loss", float(loss), i)
    oracle = Oracle(params)
    clean = float(np.mean(np.array([LABELS.index(r) for r in oracle.read(x_test)]) == y_test))
    blurred = np.asarray(_augment(jax.random.PRNGKey(seed + 7), jnp.asarray(x_test, jnp.float32) / 255.0))
    soft = float(np.mean(np.array([LABELS.index(r) for r in oracle.read(blurred)]) == y_test))
    metrics = {"heldout_accuracy": clean, "heldout_accuracy_augmented": soft}
    if roundtrip is not None:
        k = min(len(x_test), 220)
        decoded = roundtrip(x_test[:k])
        metrics["heldout_accuracy_roundtrip"] = float(np.mean(np.array([LABELS.index(r) for r in oracle.read(decoded)]) == y_test[:k]))
    log(f"oracle: held-out-scene accuracy {metrics}")
    return oracle, metrics
