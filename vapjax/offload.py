"""Weight streaming (`offload="layers"`): the transformer's stacked layers live in host memory and
each layer is copied to the device when the layer scan reaches it.

Only the per-layer stacks (every `blocks` subtree: backbone, expert, LoRA) move; embeddings, the
output head and the timestep MLPs are small and stay on the device. The whole host-resident stack
enters the layer loop (`scan_layers`): the loop body indexes its one layer out of it by the loop counter
(a dynamic slice of host memory) and `to_device` asks XLA for that layer's copy into device memory; XLA's
host-offload passes turn the pair into one asynchronous host-to-device transfer which its scheduler can
start while the previous layer computes. Slicing a run of layers out of the stack *before* the loop
(`a[start:stop]`, as a resident run does) would instead copy the whole run at once. The copy changes
where the bytes are, not their values, so a streamed run equals the resident run bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
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


def take(stack: Any, index) -> Any:
    """Layer `index` (an int or a traced loop counter) of a tree of [L, …] stacks."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), stack)


def scan_layers(body: Callable, state: Any, stacks: tuple, firsts: tuple, length: int, *, stream: bool):
    """`jax.lax.scan(body, state, …)` over `length` consecutive layers: step i hands `body` the tuple of
    layer `firsts[k] + i` of each tree `stacks[k]` (when streamed, firsts may be traced: an outer loop's
    counter). Resident (`stream` False): the runs are sliced out before the loop and scanned over, as usual.
    Streamed: the whole stacks stay where they are (host memory) and each step takes its own layer, so
    only one layer per step crosses to the device (`layer_body` puts it there)."""
    if not stream:
        xs = tuple(jax.tree.map(lambda a: a[f:f + length], t) for t, f in zip(stacks, firsts))
        return jax.lax.scan(body, state, xs)

    def step(s, i):
        return body(s, tuple(take(t, f + i) for t, f in zip(stacks, firsts)))
    return jax.lax.scan(step, state, jnp.arange(length))
