"""What every family's generation pipeline shares: its components, its output and the recorder hook."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from vapjax import checkpoint, offload, quantize, sharding
from vapjax.memory import OFFLOAD_MODES

# recorder(name, value): receives the run's intermediates (channels-last arrays), e.g. `dict.__setitem__`.
Recorder = Callable[[str, Any], None]


@dataclasses.dataclass
class Output:
    frames: np.ndarray                 # float32 [F, H, W, 3] in [0, 1]
    latents: np.ndarray                # final latents [1, f, h, w, C]


@dataclasses.dataclass
class Component:
    config: Any
    params: Any


def require_pipeline_folder(path: str) -> None:
    """A one-line CheckpointError unless `path` is a converted vapjax pipeline folder."""
    if not os.path.isdir(path):
        raise checkpoint.CheckpointError(f"{path}: no such checkpoint folder")
    if not os.path.exists(os.path.join(path, "pipeline.json")):
        hint = ("it is a diffusers folder: convert it first with python -m convert "
                f"{path} OUT_DIR" if os.path.exists(os.path.join(path, "model_index.json"))
                else "convert a diffusers pipeline folder with python -m convert SRC OUT_DIR")
        raise checkpoint.CheckpointError(f"{path}: not a converted vapjax pipeline ({hint})")


def check_offload(mode: str) -> None:
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload={mode!r}: one of {', '.join(OFFLOAD_MODES)}")


def placement_for(offload: str, placement: "Placement | None") -> "Placement":
    """`placement` (default: one device) with the transformer's layers streamed iff offload="layers"."""
    check_offload(offload)
    return dataclasses.replace(placement or Placement(), stream=offload == "layers")


# How the transformer's activations are split over the mesh's `tensor` axis: attention heads (and
# FFN units), or the tokens of the joint sequence (for head counts the axis does not divide).
SPLITS = {"heads": sharding.RULES,
          "sequence": {**sharding.RULES, "activation_length": "tensor", "activation_heads": None}}


def parse_mesh(text: str, devices: Sequence[Any] | None = None) -> Mesh | None:
    """"data=2,tensor=4" -> a (data, fsdp, tensor) mesh over the local devices (unnamed axes 1, one
    size may be -1: the rest); "" -> None (one device)."""
    if not text:
        return None
    sizes = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name.strip() not in sharding.MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh={text!r}: expected axis=size pairs over {', '.join(sharding.MESH_AXES)}, "
                             "e.g. data=2,tensor=4")
        sizes[name.strip()] = int(size)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    return sharding.make_mesh(**sizes, devices=devices if devices is not None else jax.local_devices())


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the transformer's denoising loop runs: one device (mesh None), or a mesh with the
    parameters split by `vapjax.sharding`'s rules, the CFG batch over `data` and the activations by
    `split` (SPLITS). The encoders stay on the first device."""
    mesh: Mesh | None = None
    split: str = "heads"
    stream: bool = False  # the layer stacks in host memory, streamed to the device (offload="layers")
    quantize: str = ""    # "int8": the backbone's stacked kernels stored as int8 (vapjax.quantize)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r}: one of {', '.join(SPLITS)}")
        if self.quantize and self.mesh is not None:
            raise ValueError(f"quantize={self.quantize!r} runs on one device; drop it or the mesh")

    @property
    def rules(self) -> dict:
        return SPLITS[self.split]

    @property
    def data_parallel(self) -> bool:
        return self.mesh is not None and self.mesh.shape["data"] > 1

    def params(self, tree: Any) -> Any:
        if self.quantize:  # (a dry run's abstract weights get the quantised shapes)
            store = lambda t: quantize.quantize_backbone(t, self.quantize)  # noqa: E731
            tree = jax.eval_shape(store, tree) if _is_abstract(tree) else store(tree)
        if self.mesh is None and not self.stream and not self.quantize:
            return tree
        if self.mesh is not None:
            shardings = sharding.param_shardings(tree, self.mesh, self.rules)
        else:
            shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), tree)
        if self.stream:
            shardings = offload.host_stacks(shardings)
        if _is_abstract(tree):  # a dry run: the shardings go with the shapes
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
        return jax.device_put(tree, shardings)

    def restore(self, path: str, kind: str, **kw) -> tuple[Any, Any]:
        """`checkpoint.load` of a transformer straight into this placement: each array restored onto its
        target sharding (the mesh's rules, or the first local device; the layer stacks in pinned host
        memory when streamed), and for int8 the backbone's kernels read into host memory, where `params`
        quantises them, so no device ever holds them in full precision. `params` then moves nothing
        else."""
        return checkpoint.load(path, kind, sharding=self._target, host=self._quantised if self.quantize else None,
                               **kw)

    def _target(self, path: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        if self.mesh is not None:
            where = NamedSharding(self.mesh, sharding.spec(sharding.param_axes(path, shape), shape, self.mesh,
                                                           self.rules))
        else:
            where = SingleDeviceSharding(jax.local_devices()[0])
        return offload.on_host(where) if self.stream and offload.STACKS in path else where

    @staticmethod
    def _quantised(path: tuple[str, ...]) -> bool:
        """The arrays `quantize.quantize_backbone` replaces: the backbone layer stack's kernels."""
        return path[:2] == ("backbone", "blocks") and path[-1] == "kernel"

    def batch(self, x: Any) -> Any:
        """An input whose leading axis is the (CFG) batch: split over the data-parallel axes."""
        if self.mesh is None:
            return x
        axes = ("batch",) + (None,) * (np.ndim(x) - 1)
        return _put(x, NamedSharding(self.mesh, sharding.spec(axes, np.shape(x), self.mesh, self.rules)))

    def replicated(self, x: Any) -> Any:
        return x if self.mesh is None else _put(x, sharding.replicated(self.mesh))

    def gather(self, x: Any) -> Any:
        """A result back on the first local device (where the encoders run); from a mesh over several
        processes, every process gets the whole result."""
        if self.mesh is None:
            return x
        if not all(a.is_fully_addressable for a in jax.tree.leaves(x)):
            x = multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, jax.local_devices()[0])

    def context(self):
        return sharding.use_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()


def _put(x: Any, where: NamedSharding) -> jax.Array:
    """`x` (the same value on every process) placed by `where`; over several processes each one
    fills only its own devices' pieces."""
    if where.is_fully_addressable:
        return jax.device_put(x, where)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, where, lambda index: host[index])


def _is_abstract(tree: Any) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
