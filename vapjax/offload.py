"""Weight streaming (`offload="layers"`): the transformer's stacked layers live in host memory and
each layer is copied to the device when the layer scan reaches it.

Only the per-layer stacks (every `blocks` subtree: backbone, expert, LoRA) move; embeddings, the
output head and the timestep MLPs are small and stay on the device. Inside the jitted loop the scan
slices one layer out of the host-resident stack and `to_device` asks XLA for its copy into device
memory; XLA's host-offload passes turn that into an asynchronous transfer which its scheduler can start
while the previous layer computes. The copy changes where the bytes are, not their values, so a
streamed run equals the resident run bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import NamedSharding, SingleDeviceSharding

from vapjax import quantize

HOST = "pinned_host"
STACKS = "blocks"  # the key of a per-layer stack in every transformer's parameter tree


def on_host(sharding: Any) -> Any:
    """`sharding` with its arrays in pinned host memory."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, sharding.spec, memory_kind=HOST)
    if isinstance(sharding, SingleDeviceSharding):
        return SingleDeviceSharding(next(iter(sharding.device_set)), memory_kind=HOST)
    raise TypeError(f"cannot move a {type(sharding).__name__} to host memory")


def host_stacks(shardings: Any) -> Any:
    """A tree of shardings with every per-layer stack's (any path through `blocks`) moved to host memory."""
    def move(path, s):
        keys = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return on_host(s) if STACKS in keys else s
    return jax.tree_util.tree_map_with_path(move, shardings)


def to_device(tree: Any) -> Any:
    """Inside jit: the arrays of `tree` copied into device memory (no-op for arrays already there)."""
    return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device), tree)


def layer_body(body: Callable, *, stream: bool, dtype) -> Callable:
    """A scanned layer body `body(state, layer_params)` that first brings its layer to the device (if
    `stream`) and dequantises its int8 kernels to `dtype` (vapjax.quantize; a no-op for plain weights)."""
    def wrapped(state, params):
        return body(state, quantize.dequantize(to_device(params) if stream else params, dtype))
    return wrapped
