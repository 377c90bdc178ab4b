"""Weight-only int8 storage for the frozen backbone's layer stacks.

Each matmul kernel of `backbone/blocks` ([L, ..., in, out]) is stored as int8 with one float32 scale per
layer and output channel (symmetric absmax: w ≈ q · s, |q| ≤ 127), half the bytes of bf16. The layer
scan dequantises one layer at a time (`dequantize`, called by every model's layer body through
`vapjax.offload.layer_body`), so the device never holds more than one layer in the compute dtype.
Only the frozen backbone is quantised: the expert, norms, biases and embeddings keep their dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("", "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8:
    """A quantised kernel: `values` int8 [..., in, out], `scale` float32 [..., 1, out]."""
    values: Any
    scale: Any

    def dequantize(self, dtype) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_kernel(w) -> Int8:
    """A host (numpy) kernel is quantised on the host, a layer at a time (no full-precision copy of the
    stack ever reaches a device; a loader reads the backbone's kernels so); a jax array where it is."""
    if isinstance(w, np.ndarray):
        parts = [_quantize(np, layer) for layer in w] if w.ndim > 2 else [_quantize(np, w)]
        stack = lambda xs: np.stack(xs) if w.ndim > 2 else xs[0]  # noqa: E731
        return Int8(stack([p.values for p in parts]), stack([p.scale for p in parts]))
    return _quantize(jnp, w)


def _quantize(xp, w) -> Int8:
    """Symmetric absmax per output channel, in float32, with the array module `xp` (numpy or jax.numpy)."""
    w = xp.asarray(w, xp.float32)
    scale = xp.abs(w).max(axis=-2, keepdims=True) * xp.float32(1 / 127)  # what XLA makes of "/ 127": host = device
    scale = xp.where(scale == 0, xp.float32(1), scale).astype(xp.float32)
    return Int8(xp.clip(xp.rint(w / scale), -127, 127).astype(xp.int8), scale)


def quantize_stack(blocks: dict, mode: str) -> dict:
    """A stream's layer stack with every `kernel` stored as `mode` ("" keeps it); the models build their
    backbone's parameter tree through this, so a quantised tree is the one they expect."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: one of {', '.join(repr(m) for m in MODES)}")
    if not mode:
        return blocks
    return {k: quantize_stack(v, mode) if isinstance(v, dict) else quantize_kernel(v) if k == "kernel" else v
            for k, v in blocks.items()}


def quantize_backbone(params: dict, mode: str) -> dict:
    """`params` with the backbone's layer stack quantised (`quantize_stack`)."""
    if not mode:
        return params
    backbone = {**params["backbone"], "blocks": quantize_stack(params["backbone"]["blocks"], mode)}
    return {**params, "backbone": backbone}


def dequantize(tree: Any, dtype) -> Any:
    """Every Int8 in `tree` as an array of `dtype` (a tree without any is returned as it is)."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, Int8) else x, tree,
                        is_leaf=lambda x: isinstance(x, Int8))
