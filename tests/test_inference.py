"""Inference that fits and scales: dry runs (XLA's memory analysis of every compiled stage, on abstract
weights), Hub ids converted once into a cache, offload modes, and one video sharded over several devices."""
import json
import os
import shutil
import subprocess
import sys
from functools import partial

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.lib.mlir import ir  # MLIR's Python bindings, to walk a lowered program's uses

import convert
from configs import cog_vap_tiny, wan_vap_tiny
from conftest import ROOT, golden_dir, with_xla_flags
from vapjax import memory
from vapjax.models import cogvideox, wan
from vapjax.pipelines.cogvideox_vap import CogVideoXVAP
from vapjax.pipelines.cogvideox_vap import Request as CogRequest
from vapjax.pipelines.common import Placement, placement_for
from vapjax.quantize import Int8
from vapjax.pipelines.wan_vap import Request as WanRequest
from vapjax.pipelines.wan_vap import WanVAP
from vapjax.tree import flatten
from vapjax.video import read_image, read_video


def test_memory_analysis_counts_weights_inputs_outputs():
    """A known function: weights [1024, 1024] f32 (4 MiB), input [8, 1024] (32 KiB), output [8, 1024]."""
    stage = memory.Stage("matmul", "transformer", jax.jit(lambda w, x: x @ w),
                         (jax.ShapeDtypeStruct((1024, 1024), np.float32), jax.ShapeDtypeStruct((8, 1024), np.float32)))
    m = memory.analyse(stage)
    assert (m.weights, m.inputs, m.output) == (4 * 2 ** 20, 32 * 2 ** 10, 32 * 2 ** 10)
    # Peaks per mode: a text stage of 1 MiB weights + 3 MiB activations, the transformer's stage above.
    text = memory.StageMemory("text", "text_encoder", weights=2 ** 20, inputs=0, output=0, temp=3 * 2 ** 20, alias=0)
    p = memory.peaks([text, m], {"text_encoder": 2 ** 20, "transformer": m.weights}, streamed=2 ** 20)
    assert p["none"] == 2 ** 20 + m.weights + 3 * 2 ** 20             # everything resident, worst activations
    assert p["encoders"] == m.weights + 4 * 2 ** 20                    # transformer + the text stage
    assert p["layers"] == p["encoders"] - 2 ** 20


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_dry_run_compiles_every_stage_on_abstract_weights(family):
    """The tiny pipelines with ShapeDtypeStruct weights (nothing allocated): every stage compiles; the
    denoising loop's weights are the transformer's parameter bytes."""
    c = (cog_vap_tiny if family == "cogvideox" else wan_vap_tiny).get_config()
    cls, req = (CogVideoXVAP, CogRequest) if family == "cogvideox" else (WanVAP, WanRequest)
    pipe = cls.random_from_config(c.model, abstract=True, dtype=c.dtype, attention=c.attention or None)
    leaves = jax.tree.leaves((pipe.transformer.params, vars(pipe.encoders)))
    assert not [x for x in leaves if isinstance(x, (jax.Array, np.ndarray))]  # no weight was allocated
    request = req(prompt="", ref_prompts=("",), height=c.height, width=c.width, num_frames=c.num_frames, steps=2,
                  max_sequence_length=c.max_sequence_length)
    stages = [memory.analyse(s) for s in pipe.stages(request)]
    shapes = (cogvideox if family == "cogvideox" else wan).param_shapes(pipe.transformer.config)
    (denoise,) = [s for s in stages if s.component == "transformer"]
    # The loop's arguments are its weights and inputs; jit drops unused ones (a few bytes of Wan's step table).
    assert 0 <= memory.nbytes(shapes) - denoise.weights <= 64
    assert all(s.temp > 0 and s.output > 0 for s in stages)
    p = memory.peaks(stages, {s.component: s.weights for s in stages}, memory.streamed_bytes(shapes))
    assert p["none"] >= p["encoders"] >= p["layers"] > 0



# Primitives that may touch a host-resident array: moving it, or indexing a layer out of its stack.
MOVES = {"device_put", "dynamic_slice", "squeeze", "reshape", "scan", "pjit", "jit", "closed_call",
         "checkpoint", "remat", "while", "cond", "custom_jvp_call", "custom_vjp_call"}


def host_reads(jaxpr) -> list[str]:
    """Primitives anywhere in `jaxpr` (nested jaxprs included) that compute on a host-memory array."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name not in MOVES and any(
                str(getattr(v.aval, "memory_space", "")).endswith("Host") for v in eqn.invars if hasattr(v, "aval")):
            found.append(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += host_reads(sub)
    return found


def host_transfers(lowered):
    """How the pinned-host arguments of `lowered` (a program lowered for CUDA) reach the device, found by
    following every use of each through loops and calls: ({argument: (its shape, the shapes it moves to
    the device)}, violations). A host stack may only be passed on (while, call) or have ONE layer
    dynamically sliced out of it; a host layer may only be reshaped and moved to the device
    (annotate_device_placement). Violations: any other op on host data (a slice of several layers before
    the loop — a whole-run copy —, host compute)."""
    module = lowered.compiler_ir("stablehlo")
    funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op for op in module.body.operations}
    main = funcs["main"]
    args = zip(main.regions[0].blocks[0].arguments, ir.ArrayAttr(main.attributes["arg_attrs"]))
    transfers, violations = {}, []

    def follow(value, i, layer, calls=()):
        for use in value.uses:
            op, k = use.owner, use.operand_number
            shape = lambda: tuple(ir.RankedTensorType(op.results[0].type).shape)
            if op.name == "stablehlo.while":
                for region in op.regions:
                    follow(region.blocks[0].arguments[k], i, layer, calls)
                follow(op.results[k], i, layer, calls)
            elif op.name == "func.call":
                callee = funcs[ir.FlatSymbolRefAttr(op.attributes["callee"]).value]
                follow(callee.regions[0].blocks[0].arguments[k], i, layer, calls + (op,))
            elif op.name == "func.return":  # back to the call site
                follow(calls[-1].results[k], i, layer, calls[:-1])
            elif op.name == "stablehlo.return":  # a loop's carry: its result is followed from the while
                pass
            elif op.name == "stablehlo.dynamic_slice" and k == 0 and not layer and shape()[0] == 1:
                follow(op.results[0], i, True, calls)
            elif op.name == "stablehlo.reshape" and layer:
                follow(op.results[0], i, True, calls)
            elif op.name == "stablehlo.custom_call" and layer and "annotate_device_placement" in str(
                    op.attributes["call_target_name"]) and '"device"' in str(op.attributes["mhlo.frontend_attributes"]):
                transfers.setdefault(i, []).append(shape())
            else:
                violations.append(f"{op.name} on host argument {i}{' (a layer)' if layer else ''}")

    stacks = {}
    for i, (arg, attrs) in enumerate(args):
        if "pinned_host" in str(attrs):
            stacks[i], transfers[i] = tuple(ir.RankedTensorType(arg.type).shape), []
            follow(arg, i, False)
    return {i: (stacks[i], moved) for i, moved in transfers.items()}, violations


def assert_streams(stage):
    """The denoising stage, lowered for a CUDA GPU (on this CPU: lowering needs no device), streams: every
    pinned-host argument is a layer stack that enters the loops whole and reaches the device one layer at
    a time (the layer's shape, from a dynamic slice by the loop counter), and nothing else touches it."""
    lowered = stage.fn.trace(*memory.abstract(stage.args), **stage.static).lower(lowering_platforms=("cuda",))
    transfers, violations = host_transfers(lowered)
    assert transfers and not violations, violations[:10]
    for i, (shape, moved) in transfers.items():
        assert moved and set(moved) == {shape[1:]}, (i, shape, moved)


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_streamed_layers_equal_the_resident_run_bit_for_bit(family):
    """offload="layers": every layer stack (paths through `blocks`) sits in pinned host memory, the rest
    of the transformer on the device; the denoising loop computes on no host array (each layer is
    device_put before use) and its video equals the resident run's exactly."""
    c = (cog_vap_tiny if family == "cogvideox" else wan_vap_tiny).get_config()
    cls, request = (CogVideoXVAP, CogRequest) if family == "cogvideox" else (WanVAP, WanRequest)
    image, (ref, _) = read_image(c.image), read_video(c.ref_video)
    req = request(prompt=c.prompt, ref_prompts=(c.ref_prompt,), height=c.height, width=c.width,
                  num_frames=c.num_frames, steps=2, max_sequence_length=c.max_sequence_length)
    resident = cls.random_from_config(c.model, dtype="float32", attention=c.attention or None, offload="none")
    want = resident(image, [ref], req)
    pipe = cls(resident.transformer, resident.encoders, resident.schedule, placement_for("layers", None))
    assert pipe.transformer.config.stream_layers and not resident.transformer.config.stream_layers
    kinds = {p: a.sharding.memory_kind for p, a in flatten(pipe.transformer.params).items()}
    assert {k for p, k in kinds.items() if "blocks" in p} == {"pinned_host"}
    assert {k for p, k in kinds.items() if "blocks" not in p} == {"device"}
    (stage,) = [s for s in pipe.stages(req) if s.component == "transformer"]
    jaxpr = jax.make_jaxpr(partial(stage.fn, **stage.static))(*stage.args)
    assert "<host>" in str(jaxpr) and not host_reads(jaxpr.jaxpr), host_reads(jaxpr.jaxpr)
    assert_streams(stage)
    got = pipe(image, [ref], req)
    np.testing.assert_array_equal(got.latents, want.latents)
    np.testing.assert_array_equal(got.frames, want.frames)
    # The int8 backbone streams the same way (its int8 values and scales leave the host per layer).
    q = cls(resident.transformer, resident.encoders, resident.schedule, Placement(stream=True, quantize="int8"))
    (stage,) = [s for s in q.stages(req) if s.component == "transformer"]
    jaxpr = jax.make_jaxpr(partial(stage.fn, **stage.static))(*stage.args)
    assert "i8<host>" in str(jaxpr) and not host_reads(jaxpr.jaxpr), host_reads(jaxpr.jaxpr)
    assert_streams(stage)
    with pytest.raises(ValueError, match="offload='disk': one of none, encoders, layers"):
        placement_for("disk", None)



def test_transformer_loads_straight_into_its_placement(tmp_path):
    """Placement.restore, the pipelines' transformer loader, reads every array onto its target sharding and
    memory kind (resident: the device; offload="layers": the layer stacks in pinned host memory); for int8
    it reads the backbone's kernels into host memory and quantises them there, so no device ever holds
    them in float (jax.live_arrays), and the result equals quantising on the device."""
    from vapjax import checkpoint, quantize  # noqa: PLC0415
    from vapjax.random_init import random_params  # noqa: PLC0415
    cfg = cogvideox.CogVideoXConfig(**cog_vap_tiny.get_config().model.transformer.to_dict())
    params = jax.tree.map(np.asarray, random_params(cogvideox.param_shapes(cfg), 0))
    checkpoint.save(str(tmp_path / "t"), params, cfg)
    kernels = {p for p in flatten(params) if Placement._quantised(p)}
    assert kernels
    shapes = {params_at.shape for p, params_at in flatten(params).items() if p in kernels}
    for placement in (Placement(), placement_for("layers", None), Placement(quantize="int8")):
        earlier = jax.live_arrays()  # (held, so that no new array reuses an id)
        float_kernels = lambda: [a for a in jax.live_arrays() if a.shape in shapes and a.dtype != np.int8  # noqa: E731
                                 and all(a is not b for b in earlier)]
        _, tree = placement.restore(str(tmp_path / "t"), "cogvideox_transformer")
        for p, a in flatten(tree).items():
            if placement.quantize and p in kernels:
                assert isinstance(a, np.ndarray), p                       # read into host memory
            else:
                assert a.sharding == placement._target(p, a.shape), (p, a.sharding)
        kinds = {a.sharding.memory_kind for p, a in flatten(tree).items() if "blocks" in p and hasattr(a, "sharding")}
        assert kinds == ({"pinned_host"} if placement.stream else {"device"})
        if placement.quantize:
            assert not float_kernels()
            placed = flatten(placement.params(tree))
            assert not float_kernels()
            want = flatten(quantize.quantize_backbone(jax.tree.map(jnp.asarray, params), "int8"))
            for p in kernels:
                assert isinstance(placed[p], Int8) and isinstance(placed[p].values, jax.Array)
                np.testing.assert_array_equal(placed[p].values, want[p].values)
                np.testing.assert_array_equal(placed[p].scale, want[p].scale)
        del tree


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_int8_backbone_against_bf16(family):
    """quantize="int8": the backbone's stacked kernels stored as int8 + a float32 scale per layer and output
    channel (every other weight untouched), dequantised inside the layer scan. Measured against the bf16
    run of the same weights (2 DDIM/flow steps, tiny random model), relative error of the final latents:
    2.8e-2 (CogVideoX) and 1.9e-2 (Wan; its bf16 run is itself 1.5e-2 from float32); dequantised to
    float32 against float32: 4.6e-3 and 6.2e-3. The bound is what a wrong scale or layout would break."""
    c = (cog_vap_tiny if family == "cogvideox" else wan_vap_tiny).get_config()
    cls, request = (CogVideoXVAP, CogRequest) if family == "cogvideox" else (WanVAP, WanRequest)
    image, (ref, _) = read_image(c.image), read_video(c.ref_video)
    req = request(prompt=c.prompt, ref_prompts=(c.ref_prompt,), height=c.height, width=c.width,
                  num_frames=c.num_frames, steps=2, max_sequence_length=c.max_sequence_length)
    bf16 = cls.random_from_config(c.model, dtype="bfloat16", attention=c.attention or None, offload="none")
    want = bf16(image, [ref], req)
    q = cls(bf16.transformer, bf16.encoders, bf16.schedule, Placement(quantize="int8"))
    flat = flatten(q.transformer.params)
    kernels = {p: a for p, a in flat.items() if p[:2] == ("backbone", "blocks") and p[-1] == "kernel"}
    assert kernels and all(isinstance(a, Int8) and a.values.dtype == np.int8 for a in kernels.values())
    assert not [p for p, a in flat.items() if isinstance(a, Int8) and p not in kernels]
    before = memory.nbytes([a for p, a in flatten(bf16.transformer.params).items() if p in kernels])
    assert 2 * memory.nbytes([a.values for a in kernels.values()]) == before  # + a float32 scale per output channel
    got = q(image, [ref], req)
    rel = float(np.linalg.norm(got.latents - want.latents) / np.linalg.norm(want.latents))
    print(f"{family}: int8 vs bf16 backbone, rel err of the latents {rel:.2e}")
    assert 0 < rel <= {"cogvideox": 3e-2, "wan": 3e-2}[family], rel


def sample_cli(*overrides, config="configs/cog_vap_tiny.py", env=None):
    args = [sys.executable, "sample.py", "--config", config, *overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_dry_run_cli_prints_the_memory_table():
    run = sample_cli("--config.dry_run=True", "--config.steps=2")
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    for line in ("| text encoder (T5) |", "| VAE encode (one clip) |", "| denoise (2 steps, CFG batch 2) |",
                 "| VAE decode |", "| none |", "| encoders |", "| layers |"):
        assert line in out, out
    assert "nothing was run" in out and not os.path.exists(ROOT / "out" / "dry.mp4")


def hub_cache(home, repo: str, revision: str, source):
    """`source` laid out as huggingface_hub's cache holds a downloaded model repo under HF_HOME."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for part in ("model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (shutil.copytree if (source / part).is_dir() else shutil.copy)(source / part, snapshot / part)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_id_is_downloaded_converted_once_and_reused(tmp_path):
    """--config.checkpoint=Org/Name: huggingface_hub (offline, from a HF_HOME cache in the official
    layout) finds the snapshot; sample.py converts it once into the cache keyed by its commit and the
    second run loads that copy without converting again. Both runs give the same video."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    hub_cache(tmp_path / "hf", "ByteDance/Tiny-VAP", revision, golden_dir() / "cog_pipeline_tiny")
    env = dict(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", VAPJAX_CACHE_DIR=str(tmp_path / "vapjax"))
    common = ["--config.random_init=False", "--config.checkpoint=ByteDance/Tiny-VAP", "--config.steps=2",
              "--config.max_sequence_length=96"]  # the golden tiny model's caption length
    converted = tmp_path / "vapjax" / "converted" / f"ByteDance--Tiny-VAP--{revision}--v{convert.FORMAT_VERSION}"
    frames = []
    for i in range(2):
        run = sample_cli(*common, f"--config.output={tmp_path / f'{i}.mp4'}", env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert ("converting ByteDance/Tiny-VAP@0123456789ab" in run.stdout) == (i == 0), run.stdout
        assert json.loads((converted / "pipeline.json").read_text())
        frames.append(read_video(tmp_path / f"{i}.mp4")[0])
    np.testing.assert_array_equal(frames[0], frames[1])
    assert sorted(os.listdir(converted.parent)) == [converted.name]  # no partial copies left behind
    # A Hub id that is not in the offline cache is one line.
    run = sample_cli("--config.random_init=False", "--config.checkpoint=ByteDance/Missing", env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    (err,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert "ByteDance/Missing: not a local folder and not downloadable from the Hugging Face Hub" in err


MESH_WORKER = """
import json, tempfile
import jax, numpy as np
from configs import cog_vap_tiny, wan_vap_tiny
from vapjax import checkpoint, memory, video
from vapjax.pipelines.common import Placement, parse_mesh
from vapjax.pipelines.cogvideox_vap import CogVideoXVAP, Request as CogRequest
from vapjax.pipelines.wan_vap import WanVAP, Request as WanRequest
from vapjax.tree import flatten

out = {"devices": jax.device_count()}
for family, module, cls, request, split in (("cogvideox", cog_vap_tiny, CogVideoXVAP, CogRequest, "heads"),
                                            ("wan", wan_vap_tiny, WanVAP, WanRequest, "sequence")):
    c = module.get_config()
    c.model.transformer.num_heads = 4                     # so that tensor=4 splits the heads
    image, (ref, _) = video.read_image(c.image), video.read_video(c.ref_video)
    req = request(prompt=c.prompt, ref_prompts=(c.ref_prompt,), height=c.height, width=c.width,
                  num_frames=c.num_frames, steps=1, max_sequence_length=c.max_sequence_length)
    one = cls.random_from_config(c.model, dtype="float32", attention=c.attention or None)
    want = one(image, [ref], req)
    # The same weights and encoders (already compiled), the transformer over the mesh.
    pipe = cls(one.transformer, one.encoders, one.schedule, Placement(parse_mesh("data=2,tensor=4"), split))
    got = pipe(image, [ref], req)
    (q,) = [a for p, a in flatten(pipe.transformer.params).items() if p[0] == "backbone" and p[-2:] in
            (("to_q", "kernel"),) and "attn2" not in p]
    (stage,) = [s for s in pipe.stages(req) if s.component == "transformer"]
    with pipe.placement.context():
        hlo = stage.fn.lower(*memory.abstract(stage.args), **stage.static).as_text()
    # Loading the same weights straight into the mesh (Placement.restore) gives the placed shardings.
    folder = tempfile.mkdtemp()
    checkpoint.save(folder + "/t", jax.tree.map(np.asarray, one.transformer.params), one.transformer.config)
    _, restored = pipe.placement.restore(folder + "/t", family + "_transformer")
    restored_as_placed = all(a.sharding == b.sharding for a, b in
                             zip(jax.tree.leaves(restored), jax.tree.leaves(pipe.transformer.params)))
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    out[family] = dict(split=split, restored_as_placed=restored_as_placed, latents=rel(got.latents, want.latents), frames=rel(got.frames, want.frames),
                       q_spec=[s for s in q.sharding.spec], q_devices=len(q.sharding.device_set),
                       constraints=sorted({l.split("<@", 1)[1].split(">", 1)[0] for l in hlo.splitlines()
                                           if "sdy.sharding_constraint" in l}))
print("RESULT" + json.dumps(out))
"""


def test_one_video_over_eight_devices_equals_one_device():
    """Both families on a (data 2, tensor 4) mesh of 8 simulated CPU devices: the CFG halves split over
    `data` (CogVideoX's batch; Wan's two calls as one batch), attention heads (CogVideoX) or tokens (Wan,
    split=sequence) over `tensor`, weights split by the sharding rules (and restored from a checkpoint
    straight onto those shardings). The video equals one device's."""
    env = {**os.environ, "XLA_FLAGS": with_xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", MESH_WORKER], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT", 1)[1])
    assert out["devices"] == 8
    batch_heads = 'mesh, [{"data"}, {}, {"tensor"}, {}]'    # [B, S, N, Dh]: CFG halves x heads
    batch_tokens = 'mesh, [{"data"}, {"tensor"}, {}, {}]'   # [B, S, N, Dh]: CFG halves x tokens
    for family, want in (("cogvideox", batch_heads), ("wan", batch_tokens)):
        r = out[family]
        print(family, r["split"], f"rel err latents {r['latents']:.1e} frames {r['frames']:.1e}", r["q_spec"])
        assert r["q_spec"] == [None, None, "tensor"] and r["q_devices"] == 8  # [layers, embed, heads]
        assert r["restored_as_placed"], family
        assert want in r["constraints"], (family, r["constraints"])
        # Sharded matmuls and the split batch sum in another order: float32 round-off (a wrong split is O(1)).
        assert r["latents"] <= 1e-5 and r["frames"] <= 1e-5, (family, r)
