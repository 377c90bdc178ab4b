"""SPMD sharding: one device mesh, one logical-axis vocabulary, one rules table.

Mesh axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data parallelism with
parameters and optimizer state sharded, gathered per layer by XLA), `tensor` (attention heads and
FFN hidden units split across devices). Parameters get logical axes from their path (PARAM_AXES);
RULES maps logical axes to mesh axes. A dimension a mesh axis does not divide stays replicated.
Batches are split over `data` × `fsdp`.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vapjax.tree import Path, flatten, path_str, unflatten

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes). The vocabulary of every parameter and activation dimension.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "layers": None,        # stacked layer axis: scanned over, never split
    "embed": "fsdp",       # the residual width: FSDP shards parameters along it
    "heads": "tensor",     # attention projections (heads × head_dim flattened)
    "mlp": "tensor",       # FFN hidden units
    "modulation": "fsdp",  # adaLN outputs (6 × width)
    "vocab": "tensor",
    "conv_in": None,
    "conv_out": "fsdp",
}

# Parameter path (regex over "a/b/c") -> logical axes of its trailing dimensions. First match wins;
# a leading stacked-layer axis is recognised from the rank and named "layers".
PARAM_AXES: Sequence[tuple[str, tuple]] = (
    (r"attn/to_[qkv]/kernel$", ("embed", "heads")),
    (r"attn/to_[qkv]/bias$", ("heads",)),
    (r"attn/to_out/kernel$", ("heads", "embed")),
    (r"ff/proj_in/kernel$", ("embed", "mlp")),
    (r"ff/proj_in/bias$", ("mlp",)),
    (r"ff/proj_out/kernel$", ("mlp", "embed")),
    (r"/linear/kernel$", (None, "modulation")),      # adaLN: time embedding -> shift/scale/gate
    (r"/linear/bias$", ("modulation",)),
    (r"pos_embedding$", (None, "embed")),
    (r"head/proj_out/kernel$", ("embed", None)),
    (r"(proj|text_proj)/kernel$", (None, "embed")),   # patch and caption projections
    (r"time_embedding/.*/kernel$", (None, None)),
    (r"(scale|bias)$", ("embed",)),                    # norms and remaining biases of the width
    # T5 encoder
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"attention/[qkv]/kernel$", ("embed", "heads")),
    (r"attention/o/kernel$", ("heads", "embed")),
    (r"ffn/wi(_[01])?/kernel$", ("embed", "mlp")),
    (r"ffn/wo/kernel$", ("mlp", "embed")),
    # VAE convolutions [k..., in, out]
    (r"kernel$", ("conv_in", "conv_out")),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (or the given) devices; one size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes(path: Path, ndim: int) -> tuple:
    """Logical axis names of a parameter from its path and rank."""
    name = path_str(path)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name):  # rank-fit: drop extra leading names, or pad (conv windows) with None
            return tuple(axes[-ndim:]) if len(axes) >= ndim else (None,) * (ndim - len(axes)) + tuple(axes)
    return (None,) * ndim


def _stacked_axes(path: Path, shape: tuple[int, ...]) -> tuple:
    """Like `logical_axes`, with the leading layer axis of a stacked (scanned) parameter named."""
    stacked = "blocks" in path
    axes = logical_axes(path, len(shape) - int(stacked))
    return (("layers",) if stacked else ()) + axes


def spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict = RULES) -> PartitionSpec:
    """PartitionSpec for logical axes; a mesh axis that does not divide the dimension is dropped,
    and a mesh axis is used at most once."""
    used, out = set(), []
    for ax, dim in zip(axes, shape):
        target = rules.get(ax) if ax is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if not names or dim % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def param_shardings(tree: Any, mesh: Mesh, rules: dict = RULES) -> Any:
    """NamedShardings for a nested parameter tree (arrays or ShapeDtypeStructs)."""
    flat = flatten(tree)
    return unflatten({p: NamedSharding(mesh, spec(_stacked_axes(p, tuple(a.shape)), a.shape, mesh, rules))
                      for p, a in flat.items()})


def batch_sharding(mesh: Mesh, ndim: int, rules: dict = RULES) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    names = tuple(n for n in rules["batch"] if mesh.shape[n] > 1)
    lead = (names if len(names) > 1 else names[0]) if names else None
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
