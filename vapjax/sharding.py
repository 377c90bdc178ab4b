"""SPMD sharding: one device mesh, one logical-axis vocabulary, one rules table.

Mesh axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data parallelism with
parameters and optimizer state sharded, gathered per layer by XLA), `tensor` (attention heads and
FFN hidden units split across devices). Every parameter gets logical axes from its path
(PARAM_AXES; a parameter no rule names is an error, never silently replicated), and activations
inside a model are annotated with `constrain(x, axes)`. RULES maps logical axes to mesh axes. A
dimension a mesh axis does not divide stays replicated. Batches are split over `data` × `fsdp`.

Activation constraints are off unless a function is traced inside `use_rules(mesh)`: on one device
and in tests the model is untouched. Other rules express other splits, e.g. sequence parallelism:
`use_rules(mesh, {**RULES, "activation_length": "tensor", "activation_heads": None})`.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vapjax.tree import Path, flatten, path_str, unflatten

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes). The vocabulary of every parameter and activation dimension.
RULES: dict[str, Any] = {
    # parameters
    "layers": None,        # stacked layer axis: scanned over, never split
    "embed": "fsdp",       # the residual width: FSDP shards parameters along it
    "heads": "tensor",     # attention projections (heads × head_dim flattened)
    "mlp": "tensor",       # FFN hidden units
    "modulation": "fsdp",  # adaLN outputs (6 × width)
    "vocab": "tensor",
    "conv_in": None,
    "conv_out": "fsdp",
    # activations
    "batch": ("data", "fsdp"),
    "activation_batch": ("data", "fsdp"),
    "activation_length": None,     # tokens of the (joint) sequence; map to a mesh axis for sequence parallelism
    "activation_heads": "tensor",  # q/k/v/attention output heads, as the projections' "heads"
    "activation_head_dim": None,
    "activation_embed": None,      # hidden states between layers
}

# Parameter path (regex over "a/b/c") -> logical axes of its dimensions. First match wins; a leading
# stacked-layer axis ("blocks" in the path) is named "layers" and not listed here. A leading `...`
# stands for any number of unsplit dimensions (convolution windows). `None` is replicated on purpose.
PARAM_AXES: Sequence[tuple[str, tuple]] = (
    # CogVideoX transformer (backbone/… and expert/…)
    (r"attn/to_[qkv]/kernel$", ("embed", "heads")),
    (r"attn/to_[qkv]/bias$", ("heads",)),
    (r"attn/to_out/kernel$", ("heads", "embed")),
    (r"attn/to_out/bias$", ("embed",)),
    (r"attn/norm_[qk]/(scale|bias)$", (None,)),            # per-head LayerNorm over head_dim
    (r"ff/proj_in/kernel$", ("embed", "mlp")),
    (r"ff/proj_in/bias$", ("mlp",)),
    (r"ff/proj_out/kernel$", ("mlp", "embed")),
    (r"ff/proj_out/bias$", ("embed",)),
    (r"(norm[12]|norm_out)/linear/kernel$", (None, "modulation")),  # adaLN: time embedding -> shift/scale/gate
    (r"(norm[12]|norm_out)/linear/bias$", ("modulation",)),
    (r"(norm[12]/norm|norm_out/norm|norm_final)/(scale|bias)$", ("embed",)),
    (r"head/proj_out/kernel$", ("embed", None)),
    (r"head/proj_out/bias$", (None,)),
    (r"patch_embed/pos_embedding$", (None, "embed")),
    (r"patch_embed/(proj|text_proj)/kernel$", (None, "embed")),   # patch and caption projections
    (r"patch_embed/(proj|text_proj)/bias$", ("embed",)),
    (r"time_embedding/linear_[12]/kernel$", (None, None)),     # small (≤ 3072×512): replicated
    (r"time_embedding/linear_[12]/bias$", (None,)),
    # CogVideoX single-branch LoRA (lora/blocks/…): W + A·B on the attention projections, split as W
    (r"^lora/blocks/to_[qkv]/lora_a$", ("embed", None)),
    (r"^lora/blocks/to_[qkv]/lora_b$", (None, "heads")),
    (r"^lora/blocks/to_out/lora_a$", ("heads", None)),
    (r"^lora/blocks/to_out/lora_b$", (None, "embed")),
    # Wan transformer (backbone/… and expert/…): attn1 self-, attn2 cross-attention (+ image k/v)
    (r"attn[12]/(to_[qkv]|add_[kv]_proj)/kernel$", ("embed", "heads")),
    (r"attn[12]/(to_[qkv]|add_[kv]_proj)/bias$", ("heads",)),
    (r"attn[12]/to_out/kernel$", ("heads", "embed")),
    (r"attn[12]/to_out/bias$", ("embed",)),
    (r"attn[12]/norm_(q|k|added_k)/scale$", ("heads",)),   # RMSNorm across all heads: the q/k width
    (r"ffn/proj_in/kernel$", ("embed", "mlp")),
    (r"ffn/proj_in/bias$", ("mlp",)),
    (r"ffn/proj_out/kernel$", ("mlp", "embed")),
    (r"ffn/proj_out/bias$", ("embed",)),
    (r"(blocks|head)/scale_shift_table$", (None, "embed")),  # [6 or 2, width] modulation tables
    (r"blocks/norm2/(scale|bias)$", ("embed",)),
    (r"patch_embedding/kernel$", (None, "embed")),
    (r"patch_embedding/bias$", ("embed",)),
    (r"condition_embedder/time_proj/kernel$", (None, "modulation")),
    (r"condition_embedder/time_proj/bias$", ("modulation",)),
    (r"condition_embedder/(time|text)_embedder/linear_[12]/kernel$", (None, "embed")),
    (r"condition_embedder/(time|text)_embedder/linear_[12]/bias$", ("embed",)),
    (r"condition_embedder/image_embedder/proj_in/kernel$", (None, None)),   # CLIP width², small
    (r"condition_embedder/image_embedder/proj_in/bias$", (None,)),
    (r"condition_embedder/image_embedder/norm1/(scale|bias)$", (None,)),
    (r"condition_embedder/image_embedder/proj_out/kernel$", (None, "embed")),
    (r"condition_embedder/image_embedder/(proj_out/bias|norm2/scale|norm2/bias)$", ("embed",)),
    # T5 / UMT5 encoder
    (r"^embed_tokens/embedding$", ("vocab", "embed")),
    (r"relative_attention_bias/embedding$", (None, None)),     # [buckets, heads], tiny
    (r"attention/[qkv]/kernel$", ("embed", "heads")),
    (r"attention/o/kernel$", ("heads", "embed")),
    (r"ffn/wi(_[01])?/kernel$", ("embed", "mlp")),
    (r"ffn/wo/kernel$", ("mlp", "embed")),
    (r"(attention_norm|ffn_norm|final_norm)/scale$", ("embed",)),
    # CogVideoX VAE: convolutions [k..., in, out], their biases and the norms' per-channel affine
    (r"^(encoder|decoder)/.*/kernel$", (..., "conv_in", "conv_out")),
    (r"^(encoder|decoder)/.*/(bias|scale)$", ("conv_out",)),
)


class ShardingError(ValueError):
    """A parameter no rule names, or a logical axis outside the vocabulary."""


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
    """Logical axis names of a (non-stacked) parameter from its path and rank."""
    name = path_str(path)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name):
            if axes[:1] == (...,):
                axes = (None,) * (ndim - len(axes) + 1) + axes[1:]
            if len(axes) != ndim:
                raise ShardingError(f"parameter {name} has rank {ndim}, but its rule {pattern!r} names {len(axes)} axes")
            return tuple(axes)
    raise ShardingError(f"no sharding rule for parameter {name} (add one to vapjax.sharding.PARAM_AXES)")


def param_axes(path: Path, shape: Sequence[int]) -> tuple:
    """Like `logical_axes`, with the leading layer axis of a stacked (scanned) parameter named."""
    stacked = "blocks" in path
    axes = logical_axes(path, len(shape) - int(stacked))
    return (("layers",) if stacked else ()) + axes


def spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Any, rules: dict = RULES) -> PartitionSpec:
    """PartitionSpec for logical axes; a mesh axis that does not divide the dimension is dropped,
    and a mesh axis is used at most once."""
    used, out = set(), []
    for ax, dim in zip(axes, shape):
        if ax is not None and ax not in rules:
            raise ShardingError(f"logical axis {ax!r} is not in the rules ({', '.join(rules)})")
        target = rules[ax] if ax is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if not names or dim % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def param_specs(tree: Any, mesh: Any, rules: dict = RULES) -> Any:
    """PartitionSpecs for a nested parameter tree (arrays or ShapeDtypeStructs); `mesh` may be abstract."""
    return unflatten({p: spec(param_axes(p, tuple(a.shape)), a.shape, mesh, rules) for p, a in flatten(tree).items()})


def param_shardings(tree: Any, mesh: Mesh, rules: dict = RULES) -> Any:
    """NamedShardings for a nested parameter tree (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int, rules: dict = RULES) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    names = tuple(n for n in rules["batch"] if mesh.shape[n] > 1)
    lead = (names if len(names) > 1 else names[0]) if names else None
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("vapjax_sharding", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: dict = RULES) -> Iterator[None]:
    """Functions traced inside this block constrain their activations onto `mesh` by `rules`. The
    mesh is also JAX's context mesh, so a jitted function traced outside is traced again inside;
    the rules are read at trace time, so use one set of rules per jitted function."""
    token = _ACTIVE.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; the identity outside `use_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, x.shape, mesh, rules)))
