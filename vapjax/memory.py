"""Device memory of a generation, from XLA's own buffer assignment, without running anything.

A pipeline lists its jitted stages (`Pipeline.stages(request)`: text encoders, VAE encode, the whole
denoising loop, VAE decode) with abstract inputs — every weight and every input a ShapeDtypeStruct,
so nothing big is allocated. `analyse` lowers and compiles each one
(`jax.jit(...).lower(...).compile()`) and reads `compiled.memory_analysis()`: the bytes of its
arguments (weights, other inputs), its outputs and its temporaries (activations, workspace).

`peaks` combines the stages into the run's device peak under each offload mode (`OFFLOAD_MODES`):

  none      every component's weights stay on the device for the whole run;
  encoders  the transformer stays; the text/image encoders and the VAE visit the device only for their
            own stage;
  layers    as `encoders`, and the transformer's stacked layers stay in host memory: the device holds
            its other weights and the layers in flight (one in use, one prefetched). An estimate from
            the resident loop's analysis (`vapjax.offload` runs the mode; XLA's CPU analysis does not
            tell host from device buffers).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np


OFFLOAD_MODES = ("none", "encoders", "layers")
# XLA's CPU backend computes bf16 matmuls in float32; loop-invariant code motion then hoists the float32
# copy of a whole stacked weight (every layer at once) out of the layer scan, which an accelerator,
# computing bf16 natively, never does. Without that pass the copy is per layer, as an accelerator's
# slice of the stack (measured: a scanned 8 x 1024² bf16 stack, 34 MiB of temporaries -> 2 MiB).
CPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
TRANSFORMER = "transformer"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One jitted stage: `fn(*args, **static)`; `args[0]` is the parameter tree of `component`."""
    name: str
    component: str
    fn: Callable
    args: tuple
    static: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Bytes of one compiled stage (XLA's buffer assignment)."""
    name: str
    component: str
    weights: int      # the component's parameters the stage uses (an argument)
    inputs: int       # the other arguments
    output: int
    temp: int         # activations and workspace
    alias: int        # outputs that reuse an argument's buffer (counted once)

    @property
    def activations(self) -> int:
        """What the stage needs beyond its weights."""
        return self.inputs + self.output + self.temp - self.alias

    @property
    def total(self) -> int:
        return self.weights + self.activations


def abstract(tree: Any) -> Any:
    """Arrays as ShapeDtypeStructs (their shardings kept); ShapeDtypeStructs as they are."""
    def spec(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(spec, tree)


def nbytes(tree: Any) -> int:
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def streamed_bytes(params: Any) -> int:
    """Bytes of a transformer's stacked layers (paths through `blocks`, leading axis = layer) that the
    `layers` mode keeps off the device: all but two layers (one in use, one prefetched) of each stack."""
    out = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if "blocks" in {getattr(k, "key", None) for k in path}:
            layers = x.shape[0]
            out += nbytes(x) * max(layers - 2, 0) // layers
    return out


def analyse(stage: Stage) -> StageMemory:
    """Compile `stage` on abstract arguments and read XLA's memory analysis (nothing is run)."""
    args = abstract(stage.args)
    fn = stage.fn if hasattr(stage.fn, "lower") else jax.jit(stage.fn)
    options = CPU_OPTIONS if jax.default_backend() == "cpu" else {}
    compiled = fn.lower(*args, **stage.static).compile(compiler_options=options)
    m = compiled.memory_analysis()
    # jit drops unused arguments (e.g. the VAE decoder's weights when encoding): the weights a stage
    # takes are its arguments less its inputs.
    inputs = nbytes(args[1:])
    argument = m.argument_size_in_bytes + m.host_argument_size_in_bytes
    return StageMemory(stage.name, stage.component, weights=argument - inputs, inputs=inputs,
                       output=m.output_size_in_bytes + m.host_output_size_in_bytes,
                       temp=m.temp_size_in_bytes + m.host_temp_size_in_bytes,
                       alias=m.alias_size_in_bytes + m.host_alias_size_in_bytes)


def peaks(stages: Sequence[StageMemory], weights: dict[str, int], streamed: int = 0) -> dict[str, int]:
    """The run's device peak per offload mode. `weights`: bytes of every component's parameters;
    `streamed`: bytes of the transformer weights that `layers` keeps on the host less the two layers
    it holds on the device at a time."""
    total = sum(weights.values())
    resident = weights.get(TRANSFORMER, 0)
    out = {"none": total + max(s.activations for s in stages)}
    for mode, kept in (("encoders", resident), ("layers", resident - streamed)):
        out[mode] = max((kept + s.activations) if s.component == TRANSFORMER else (kept + s.total)
                        for s in stages)
    return out


def human(n: int) -> str:
    """Bytes as GiB (two decimals), or MiB / KiB below one GiB."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


def table(stages: Sequence[StageMemory], weights: dict[str, int], streamed: int = 0) -> str:
    """A markdown table of every stage and the run's peak per offload mode."""
    lines = ["| stage | weights | other inputs | output | temporaries | stage total |", "|---|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s.name} | {human(s.weights)} | {human(s.inputs)} | {human(s.output)} | {human(s.temp)} | "
                     f"{human(s.total)} |")
    p = peaks(stages, weights, streamed)
    lines.append("")
    lines.append("| offload | device peak |")
    lines.append("|---|---|")
    lines.extend(f"| {mode} | {human(p[mode])} |" for mode in OFFLOAD_MODES)
    return "\n".join(lines)
