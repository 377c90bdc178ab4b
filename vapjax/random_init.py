"""Random weights from a parameter tree's shapes, for demos, smoke tests and benchmarks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_params(shapes, seed: int):
    """Weights drawn on the host from a parameter tree's shapes alone, without running the model's
    `init` (seconds to minutes of compilation for a demo): kernels and embeddings N(0, 1/fan_in) with
    fan_in = the second-to-last axis (times the window for 3D convolutions), norm scales 1, biases and LoRA
    up-projections (`lora_b`, so a LoRA starts as the identity edit) 0, LoRA down-projections (`lora_a`)
    U(±1/√fan_in) as PEFT's kaiming-uniform (a = √5), position tables and other vectors N(0, 0.02²)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = getattr(path[-1], "key", "")
        if name in ("scale", "bias", "lora_b"):
            return jnp.full(s.shape, 1.0 if name == "scale" else 0.0, s.dtype)
        if name == "lora_a":
            bound = 1 / np.sqrt(s.shape[-2])
            return jnp.asarray(rng.uniform(-bound, bound, s.shape).astype(np.float32), s.dtype)
        std = 0.02 if name == "pos_embedding" or len(s.shape) < 2 else 1 / np.sqrt(
            s.shape[-2] * (int(np.prod(s.shape[:-2])) if len(s.shape) == 5 else 1))
        return jnp.asarray(rng.standard_normal(s.shape, np.float32) * std, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)
