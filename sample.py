"""Generate a video with Video-As-Prompt (CogVideoX or Wan) in JAX.

    python sample.py --config configs/cog_vap_tiny.py                  # tiny random models, no download
    python sample.py --config configs/wan_vap_tiny.py
    python sample.py --config configs/cog_vap.py --config.checkpoint=... --config.image=... \
        --config.ref_video=... --config.prompt=... --config.ref_prompt=...
    python sample.py --config configs/wan_vap.py --config.checkpoint=...   (same fields)
    python sample.py --config configs/cog_vap.py --config.dry_run=True     # device memory per stage, no run
    --config.checkpoint=ByteDance/Video-As-Prompt-CogVideoX-5B   a Hub id: downloaded, converted once, cached
    --config.mesh=data=2,tensor=4 [--config.split=sequence]      the denoising loop over several devices
    python sample.py ... --config.lora="style.safetensors:0.8|other.safetensors"   (LoRAs merged, vapjax.lora)

The pipeline is the config's `family` in `vapjax.families` (checked against the converted checkpoint's;
an empty `family` takes the checkpoint's). Every config field other than sample.py's own (RUN_KEYS) is a
field of that family's Request; a field the family does not have is an error.
Bad input (missing or unreadable files, a too-short reference for "first"/"random", an impossible
resolution, too many references, a folder that is not a converted checkpoint or holds another family,
a setting that cannot take effect) ends with one `error: ...` line and exit status 2.
"""
import contextlib
import dataclasses
import os
import re
import resource
import sys
import time
import warnings

import jax
import numpy as np
from absl import flags, logging
from tqdm import tqdm

import convert
from convert import __main__ as convert_cli
from convert.errors import ConversionError
from convert.lora import file_names
from vapjax import cli, compile_cache, families, lora, memory, video
from vapjax.checkpoint import CheckpointError
from vapjax.pipelines.common import Placement, parse_mesh, placement_for
from vapjax.video import VideoError


# Config fields sample.py itself reads; every other field is one of the family's Request fields.
RUN_KEYS = ("family", "checkpoint", "image", "ref_video", "ref_prompt", "output", "fps", "dtype", "attention",
            "vae_tiling", "random_init", "model", "dry_run", "offload", "mesh", "split", "quantize", "lora",
            "side_by_side", "oracle")


# A Hugging Face Hub id, optionally with a revision: Org/Name or Org/Name@rev.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(@(?P<rev>[\w./-]+))?")


def converted_cache() -> str:
    """Where Hub checkpoints are kept converted: $VAPJAX_CACHE_DIR/converted, default
    $XDG_CACHE_HOME/vapjax/converted (~/.cache/vapjax/converted)."""
    base = os.environ.get("VAPJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vapjax")
    return os.path.join(base, "converted")


def resolve_checkpoint(ref: str) -> str:
    """A converted pipeline folder for `ref`: a local folder as it is; a Hub id (Org/Name[@rev]) is
    downloaded with huggingface_hub (it honours HF_HOME, HF_HUB_OFFLINE and its cache), converted once
    into converted_cache()/Org--Name--<commit>--v<converter format version> (the source's dtype kept) and
    that copy is used from then on. A new converter version converts again rather than reuse a stale copy."""
    match = HUB_ID.fullmatch(ref)
    if os.path.exists(ref) or not match:
        return ref
    import huggingface_hub  # only for Hub ids
    from huggingface_hub.errors import HFValidationError
    try:
        src = huggingface_hub.snapshot_download(match["repo"], revision=match["rev"])
    except (HFValidationError, OSError, ValueError) as e:  # offline misses and HTTP errors are OSErrors
        raise CheckpointError(f"{ref}: not a local folder and not downloadable from the Hugging Face Hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    commit = os.path.basename(os.path.normpath(src))  # .../snapshots/<commit>
    dst = os.path.join(converted_cache(),
                       f"{match['repo'].replace('/', '--')}--{commit}--v{convert.FORMAT_VERSION}")
    if not os.path.exists(os.path.join(dst, "pipeline.json")):
        print(f"converting {match['repo']}@{commit[:12]} into {dst} (once)", flush=True)
        try:  # written beside dst and renamed into place when complete
            convert_cli.convert_folder(src, dst)
        except ConversionError as e:
            raise CheckpointError(f"{ref}: {e}") from None
    return dst


def check_settings(c) -> None:
    """A setting that cannot take effect is an error naming it, not silently ignored."""
    if c.random_init and c.checkpoint:
        raise ValueError(f"--config.checkpoint={c.checkpoint} has no effect with random_init=True (random "
                         "weights from config.model): drop one of them")
    if c.random_init and ("model" not in c or not c.get("family")):
        raise ValueError("random_init=True needs config.family and config.model (the random model's sizes, "
                         "see configs/cog_vap_tiny.py)")
    if not c.random_init and not c.checkpoint and not c.get("dry_run"):
        raise ValueError("no checkpoint: pass --config.checkpoint=<converted pipeline folder>")
    if "steps" in c and (not isinstance(c.steps, int) or c.steps < 1):
        raise ValueError(f"steps={c.steps}: must be a whole number >= 1")
    if c.get("dynamic_cfg") and c.guidance_scale <= 1:
        raise ValueError(f"dynamic_cfg=True has no effect with guidance_scale={c.guidance_scale} (no "
                         "classifier-free guidance at <= 1): set --config.dynamic_cfg=False")
    if c.get("frames_per_reference_length") and c.frames_selection != "evenly":
        raise ValueError(f"frames_per_reference_length=True has no effect with frames_selection="
                         f"{c.frames_selection!r} (it only changes 'evenly')")


def family_name(c) -> str:
    """The config's family, else the converted checkpoint's."""
    return c.get("family") or families.of_checkpoint(c.checkpoint)


def make_request(c, name: str):
    """The family's Request from the config's fields; a field it does not have is an error."""
    request = families.get(name).request
    fields = {f.name for f in dataclasses.fields(request)}
    unknown = sorted(k for k in c.keys() if k not in RUN_KEYS and k not in fields)
    if unknown:
        raise ValueError(f"setting(s) {', '.join(unknown)} do not apply to the {name} pipeline")
    # One caption per reference video, "|"-separated; a blank one (normal for uncaptioned references)
    # is a blank caption for each reference.
    num_refs = max(len([p for p in c.get("ref_video", "").split("|") if p]), 1)
    ref_prompts = tuple(c.ref_prompt.split("|")) if c.ref_prompt else ("",) * num_refs
    return request(ref_prompts=ref_prompts, **{k: c[k] for k in fields if k in c and k != "ref_prompts"})


def placement(c) -> Placement:
    """Where the denoising loop runs: `mesh` ("" one device, or e.g. "data=2,tensor=4") and `split`;
    how its backbone is stored (`quantize`)."""
    return Placement(parse_mesh(c.get("mesh", "")), c.get("split", "heads"), quantize=c.get("quantize", ""))


def build_pipeline(c):
    name = family_name(c)
    if not c.random_init and c.get("family"):
        found = families.of_checkpoint(c.checkpoint)
        if found != name:
            raise CheckpointError(f"{c.checkpoint}: a {found} checkpoint, but this config is for {name} "
                                  f"(use a {found} config, or --config.family={found})")
    pipeline = families.get(name).pipeline
    offload, where = c.get("offload", "encoders"), placement(c)
    opts = dict(dtype=c.dtype or None, attention=c.attention or None, tiling=c.vae_tiling, offload=offload,
                placement=where)
    if c.get("lora"):  # the weights stay plain and resident until the LoRAs are merged
        opts.update(offload="encoders" if offload == "layers" else offload, placement=None)
    pipe = pipeline.random_from_config(c.model, **opts) if c.random_init else pipeline.load(c.checkpoint, **opts)
    if c.get("lora"):  # external LoRAs merged into the transformer once, in the order given, then placed
        t = pipe.transformer
        names = file_names(families.get(name).transformer_kind, t.config)
        t.params = lora.load_into(t.params, lora.parse_spec(c.lora), names)
        pipe = type(pipe)(t, pipe.encoders, pipe.schedule, placement_for(offload, where))
    return pipe


def aspect_notes(image: np.ndarray, refs, req) -> list[str]:
    """A note for each input whose aspect ratio changes when it is resized to the output size."""
    def note(what, h, w):
        if abs(h * req.width - w * req.height) > 0.01 * h * req.width:  # beyond rounding
            return (f"note: {what} is {w}x{h} (aspect {w / h:.2f}); it is resized to {req.width}x{req.height} "
                    f"(aspect {req.width / req.height:.2f}), which changes its aspect ratio")
    found = [note("the image", *image.shape[:2])] + [note(f"reference video {i}", *r.shape[1:3])
                                                     for i, r in enumerate(refs)]
    return [n for n in found if n]


def prompt_notes(pipe, req) -> list[str]:
    """A note for each prompt longer than the text length the model reads (the rest is cut off)."""
    L = req.max_sequence_length
    named = [("prompt", req.prompt), *((f"reference prompt {i}", p) for i, p in enumerate(req.ref_prompts)),
             ("negative_prompt", req.negative_prompt), ("negative_ref_prompt", req.negative_ref_prompt)]
    out = pipe.encoders.tokenize([t for _, t in named], L + 1)  # one slot more: filled only by a longer text
    ids = np.asarray(out[0] if isinstance(out, tuple) else out)
    return [f"note: the {name} is longer than the {L} tokens the model reads; the rest is cut off"
            for (name, _), row in zip(named, ids) if row[L] != pipe.encoders.tokenizer.pad_id]


def side_by_side(ref: "np.ndarray", generated: "np.ndarray", req) -> "np.ndarray":
    """[reference | generated] frames, the reference's frames picked and resized as the model saw them."""
    import numpy as np  # noqa: PLC0415
    pick = video.select_reference_frames([len(ref)], len(generated), req.frames_selection, seed=req.seed)[0]
    gen = (np.clip(generated, 0, 1) * 255).astype(np.uint8) if generated.dtype != np.uint8 else generated
    return np.concatenate([video.resize(ref[pick], gen.shape[1], gen.shape[2]), gen], axis=2)


def oracle_reading(path: str, ref: "np.ndarray", generated: "np.ndarray", req) -> str:
    """The VAP-Toy oracle's reading of the reference and of the generated clip (toy-sized videos only)."""
    import numpy as np  # noqa: PLC0415
    from vapjax.toy import world  # noqa: PLC0415
    from vapjax.toy.oracle import Oracle  # noqa: PLC0415
    size = (world.FRAMES, world.HEIGHT, world.WIDTH)
    if (len(generated),) + generated.shape[1:3] != size:
        raise ValueError(f"the toy oracle reads {size[0]}-frame {size[1]}x{size[2]} clips, not "
                         f"{len(generated)}x{generated.shape[1]}x{generated.shape[2]} (drop --config.oracle)")
    pick = video.select_reference_frames([len(ref)], len(generated), req.frames_selection, seed=req.seed)[0]
    gen = (np.clip(generated, 0, 1) * 255).astype(np.uint8)
    ref_read, gen_read = Oracle.load(path).read(np.stack([video.resize(ref[pick], *size[1:]), gen]))
    name = lambda n: n.replace("_", " ")  # noqa: E731
    return f"oracle: reference: {name(ref_read)} — generated: {name(gen_read)}"


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    dev = f"device peak {stats['peak_bytes_in_use'] / 2 ** 30:.2f} GiB, " if "peak_bytes_in_use" in stats else ""
    return f"{dev}host peak RSS {host:.2f} GiB"


def dry_run(c) -> None:
    """Compile every stage on abstract weights and inputs and print XLA's device memory per stage and
    the run's peak per offload mode; nothing is run and no weights are read (a checkpoint's configs only;
    no checkpoint and no random_init: the released model's architecture)."""
    name = family_name(c) if (c.checkpoint or c.get("family")) else ""
    if not name:
        raise ValueError("dry_run needs --config.family or --config.checkpoint")
    req = make_request(c, name)
    pipeline = families.get(name).pipeline
    attention = c.attention or None
    if attention == "cudnn" and jax.default_backend() == "cpu":
        attention = "blockwise"  # cuDNN cannot compile here; blockwise is the same O(sequence) memory class
        print("note: attention=cudnn cannot compile on CPU; analysing with attention=blockwise (also flash-style)")
    dtype = c.dtype or None
    opts = dict(dtype=dtype, attention=attention, tiling=c.vae_tiling, placement=placement(c))  # every offload mode
    if c.random_init:
        pipe, source = pipeline.random_from_config(c.model, abstract=True, **opts), "config.model"
    elif c.checkpoint:
        pipe, source = pipeline.abstract_load(c.checkpoint, **opts), c.checkpoint
    else:
        pipe, source = pipeline.random_from_config(None, abstract=True, **opts), "the released architecture"
    num_refs = max(len([p for p in c.ref_video.split("|") if p]), 1)
    pipe.validate(np.zeros((req.height, req.width, 3), np.uint8),
                  [np.zeros((req.num_frames, 1, 1, 3), np.uint8)] * num_refs, req)
    stages = pipe.stages(req, num_refs)
    results = []
    for stage in stages:
        print(f"compiling {stage.name} ...", flush=True)
        with pipe.placement.context() if stage.component == memory.TRANSFORMER else contextlib.nullcontext():
            results.append(memory.analyse(stage))
    weights = {s.component: memory.nbytes(s.args[0]) for s in stages}
    print(f"\n{name} ({source}), {req.num_frames}x{req.height}x{req.width}, {dtype or 'stored dtype'}, "
          f"attention={attention or 'auto'}: device memory from XLA's memory analysis of each compiled "
          f"stage on {jax.default_backend()}{', per device of mesh ' + c.mesh if c.get('mesh') else ''} "
          "(nothing was run)\n")
    print(memory.table(results, weights, memory.streamed_bytes(pipe.transformer.params)))


def run(c) -> None:
    check_settings(c)
    if not c.get("dry_run"):
        video.check_output(c.output)  # not after the whole generation
    if c.checkpoint:
        c.checkpoint = resolve_checkpoint(c.checkpoint)
    if c.get("dry_run"):
        return dry_run(c)
    ref_paths = [p for p in c.ref_video.split("|") if p]
    if not c.image or not ref_paths:
        raise ValueError("pass --config.image=<image> and --config.ref_video=<reference video>")
    req = make_request(c, family_name(c))
    image = video.read_image(c.image)
    refs = []
    for p in ref_paths:
        frames, _ = video.read_video(p)
        if c.frames_selection != "evenly":  # "evenly" repeats frames of a short reference, as the official
            video.require_frames(p, frames, c.num_frames)
        refs.append(frames)
    for note in aspect_notes(image, refs, req):
        print(note)

    t0 = time.time()
    pipe = build_pipeline(c)
    t_load = time.time() - t0
    pipe.validate(image, refs, req)
    for note in prompt_notes(pipe, req):
        print(note)
    bar = tqdm(total=c.steps, desc="denoising", unit="step")
    t1 = time.time()
    out = pipe(image, refs, req, progress=lambda i: bar.update(1))
    bar.close()
    t_gen = time.time() - t1
    frames = side_by_side(refs[0], out.frames, req) if c.get("side_by_side") else out.frames
    video.write_video(c.output, frames, fps=c.fps)
    print(f"wrote {c.output}: {frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}"
          + (" [reference | generated]" if c.get("side_by_side") else ""))
    if c.get("oracle"):
        print(oracle_reading(c.oracle, refs[0], out.frames, req))
    print(f"time: load {t_load:.1f}s, generate {t_gen:.1f}s (incl. compilation)")
    print(f"memory: {peak_memory()}")


def main(argv):
    del argv
    # imageio's ffmpeg subprocess (fork + immediate exec) trips JAX's at-fork warning; it is harmless.
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    logging.set_verbosity(logging.WARNING)  # absl would print JAX's backend probing at INFO
    compile_cache.enable()  # a second run starts in seconds; VAPJAX_NO_COMPILE_CACHE=1 turns it off
    try:
        run(flags.FLAGS.config)
    except (VideoError, CheckpointError, ValueError, FileNotFoundError) as e:  # LoRAError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Defined here, not at import: tests import this module beside train.py, which has its own --config.
    cli.run(main, "config file, e.g. configs/cog_vap.py")
