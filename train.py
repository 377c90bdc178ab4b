"""Train the VAP expert (backbone frozen) on one device, many devices or many hosts, for any model
family of `vapjax.families` (`c.family`: "cogvideox" or "wan").

    python train.py --config configs/cog_vap_train_tiny.py                 # tiny, CPU, synthetic data
    python train.py --config configs/wan_vap_train_tiny.py                 # tiny Wan, CPU, synthetic data
    python train.py --config configs/cog_vap_train.py --config.init_checkpoint=ckpt/init \
        --config.data.dir=vap_data_latents --config.workdir=runs/vap

Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under a cluster
manager JAX detects, e.g. SLURM) and start the same command on every host. Re-running the same command
resumes from the newest readable checkpoint in the workdir; one written for another model (config,
expert layers, shapes, dtypes) stops the run with a one-line error naming the difference.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from convert.lora import module_names
from vapjax import checkpoint, cli, compile_cache, families, lora, sharding, training, validation
from vapjax import tree as vtree
from vapjax.data.ref_dropout import RefDropout
from vapjax.pipelines.common import Placement
from vapjax.random_init import random_params


# Model run options a resumed run may change (they do not change the parameters or the math).
RESUMABLE_OPTIONS = ("attention", "remat")


class TrainingError(RuntimeError):
    """Stops training with a one-line message (non-finite loss, bad setup)."""


class UsageError(ValueError):
    """Bad input found before any work starts: one line, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C stopped the run after a step (its checkpoint written)."""


class StopRequest:
    """SIGINT handler. Until the first step has run (loading, compiling) nothing is worth saving, and
    unwinding Python through XLA's compiler crashes the interpreter (segfault at exit): it leaves at once,
    exit status 130, without teardown. Afterwards the first Ctrl-C lets the step finish, checkpoints and
    stops; a second one leaves at once."""

    def __init__(self):
        self.requested = False
        self.graceful = False      # set by `train` once a step has run

    def __call__(self, signum=None, frame=None) -> None:
        if self.requested or not self.graceful:
            os.write(2, b"interrupted\n")
            os._exit(130)
        self.requested = True
        os.write(2, b"interrupted: stopping after this step (Ctrl-C again to stop now)\n")


def check_paths(c) -> None:
    """The workdir and the data exist as the config says, before anything is created or loaded."""
    if os.path.exists(c.workdir) and not os.path.isdir(c.workdir):
        raise UsageError(f"workdir {c.workdir} is a file, not a folder")
    if c.data.kind == "synthetic":
        return
    if not c.data.dir:
        raise UsageError(f"data.kind={c.data.kind!r} needs --config.data.dir=<prepared dataset folder>")
    if not os.path.isfile(os.path.join(c.data.dir, "dataset_info.json")):
        what = "no such folder" if not os.path.isdir(c.data.dir) else "not a prepared dataset (no dataset_info.json)"
        raise UsageError(f"data.dir {c.data.dir}: {what}; build it with python -m vapjax.data.vap_data "
                         "(and python -m vapjax.data.precompute for data.kind='latents')")
    if c.recipe == "dpo" and c.data.get("scores_csv") and not os.path.isfile(c.data.scores_csv):
        raise UsageError(f"data.scores_csv {c.data.scores_csv}: no such file")


def maybe_initialize_distributed() -> None:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()


def load_model(c):
    """(model config, full parameter tree) of family `c.family` from a converted checkpoint or random
    tiny weights. Every floating weight is cast to `param_dtype`: the official trainer holds the whole
    transformer in bf16 (spec §7.1, §8.14); modules that compute in float32 still do."""
    family = families.get(c.family)
    options = c.model_options.to_dict()
    options["attention"] = options.get("attention") or None
    if c.random_init:
        cfg = checkpoint.KINDS[family.transformer_kind](**c.model.to_dict(), **options)
        params = random_params(family.param_shapes(cfg), c.seed)
    else:
        if not c.init_checkpoint:
            raise TrainingError(f"no init_checkpoint: pass --config.init_checkpoint=<converted transformer folder> "
                                f"({family.convert_hint})")
        cfg, params = checkpoint.load(c.init_checkpoint, family.transformer_kind)
        # c.model overrides the checkpoint's architecture fields, e.g. an ablation (structure="single_branch_lora",
        # expert_layers=()): partitions the model has no use for are dropped, a LoRA it adds starts at zero.
        cfg = cfg.with_options(**c.model.to_dict(), **options)
        shapes = family.param_shapes(cfg)
        params = {k: v for k, v in params.items() if k in shapes}
        params.update(random_params({k: s for k, s in shapes.items() if k == "lora" and k not in params}, c.seed))
        have, want = vtree.flatten(params), vtree.flatten(shapes)
        # A module missing from the checkpoint's expert (e.g. the head of ref_head=True) starts as its backbone
        # twin, as the official init copies every `_mot_ref` module from its base module (CSPEC:399-403). A
        # checkpoint without an expert stays an error (convert it with an expert).
        twins = {p: ("backbone",) + p[1:] for p in want if p[0] == "expert" and p not in have and "expert" in params}
        have.update({p: have[q] for p, q in twins.items() if q in have})
        params = vtree.unflatten(have)
        bad = [p for p in want if p not in have or tuple(have[p].shape) != tuple(want[p].shape)]
        if bad:
            raise TrainingError(f"{c.init_checkpoint} does not fit the configured model: {vtree.path_str(bad[0])} "
                                f"is {tuple(have[bad[0]].shape) if bad[0] in have else 'missing'}, the model needs "
                                f"{tuple(want[bad[0]].shape)} ({family.convert_hint})")
    cast = lambda a: a.astype(options["param_dtype"]) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return cfg, jax.tree.map(cast, params)


def make_data(c, model_cfg):
    """(batch iterator with get_state/set_state, empty-caption embedding [L, D]) for data.kind
    'synthetic' (the family's random dataset), 'latents' (precomputed vap_latents) or 'raw' (vap_data,
    encoded on the fly by the encoders of data.pipeline). data.mask_ref_ratio > 0: multi-reference SFT."""
    it, empty = _make_batches(c, model_cfg)
    if c.data.get("mask_ref_ratio"):
        if c.recipe != "sft" or c.data.num_refs < 2:
            raise TrainingError(f"data.mask_ref_ratio={c.data.mask_ref_ratio} has no effect with recipe {c.recipe!r} "
                                f"and data.num_refs={c.data.num_refs} (multi-reference SFT needs num_refs >= 2)")
    # A clip with fewer references than num_refs trains with the ones it has (RefDropout caps N).
    if c.data.get("mask_ref_ratio") or (c.data.get("allow_fewer_refs") and c.data.num_refs > 1):
        it = RefDropout(it, num_refs=c.data.num_refs, mask_ref_ratio=c.data.get("mask_ref_ratio", 0.0),
                        seed=c.data.seed)
    return it, empty


def _make_batches(c, model_cfg):
    family = families.get(c.family)
    if c.data.kind == "synthetic":
        return (family.dpo_synthetic if c.recipe == "dpo" else family.synthetic_data)(c, model_cfg)
    # TFDS and grain: imported only for real data.
    from vapjax.data import dpo_pairs, features, loader  # noqa: PLC0415
    if c.batch_size % jax.process_count():
        raise TrainingError(f"batch_size {c.batch_size} does not split over {jax.process_count()} hosts")
    if c.recipe == "dpo":  # (win, lose, reference) triples drawn by score from the CSV (spec §7.8)
        if c.data.kind != "latents" or not c.data.get("scores_csv"):
            raise TrainingError("recipe 'dpo' reads pairs from data.kind='latents' with data.scores_csv=<VAP-Data "
                                "vap_data.csv> (the alignment scores)")
        builder = loader.open_builder(c.data.dir)
        fields = [f for f in builder.info.features if f not in loader.BOOKKEEPING]
        scores, kinds = dpo_pairs.read_scores(c.data.scores_csv)
        index = loader.example_index(builder)   # names only: no record is read before the first batch
        it = dpo_pairs.DPOPairs(builder.as_data_source(split="train"), index["path"], scores, kinds, fields,
                                splits=index["split"], batch_size=c.batch_size // jax.process_count(),
                                seed=c.data.seed, workers=max(1, c.data.worker_count))
        return it, loader.empty_text(c.data.dir)
    it = loader.make_loader(c.data.dir, kind=c.data.kind, batch_size=c.batch_size // jax.process_count(),
                            num_refs=c.data.num_refs, seed=c.data.seed, worker_count=c.data.worker_count,
                            allow_fewer_refs=c.data.get("allow_fewer_refs", False))
    if c.data.kind == "latents":
        return it, loader.empty_text(c.data.dir)
    # Raw clips: encode with the pipeline's encoders on the fly (as the official trainer does).
    if not c.data.pipeline:
        raise TrainingError("data.kind='raw' needs data.pipeline=<converted pipeline folder> for its encoders")
    encode = features.load_features(c.data.pipeline, text_length=family.text_length(c, model_cfg))
    return features.EncodedBatches(it, encode), encode.empty_text()


class MetricsSink:
    """Process 0's outputs: every step to <workdir>/metrics.jsonl, summaries to stdout and TensorBoard."""

    def __init__(self, c, enabled: bool, start: int = 0):
        """`start`: the first step this run trains; rows of a previous run from it on are dropped (a resumed
        run redoes the steps after its checkpoint), from metrics.jsonl and, by a purge, from TensorBoard."""
        self.file = self.writer = None
        if not enabled:
            return
        path = os.path.join(c.workdir, "metrics.jsonl")
        if os.path.exists(path):
            keep = [line for line in open(path) if _row_step(line) < start]
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)
        self.file = open(path, "a")
        if c.tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415  (optional dependency)
            self.writer = SummaryWriter(os.path.join(c.workdir, "tb"), purge_step=start or None)

    def step(self, m: dict) -> None:
        if self.file:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()

    def summary(self, step: int, line: dict) -> None:
        if not self.file:
            return
        tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in line.items()))
        if self.writer:
            for k, v in line.items():
                self.writer.add_scalar(k.replace("/", "_per_"), v, step)

    def close(self) -> None:
        for f in (self.file, self.writer):
            if f:
                f.close()


def _row_step(line: str) -> float:
    """A metrics.jsonl row's step; a torn last line (a killed run) counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return float("inf")


def make_objective(c, model_cfg):
    """The family's objective for recipe `c.recipe` ("sft" or "dpo")."""
    family = families.get(c.family)
    if c.recipe == "sft":
        return family.objective(c, model_cfg)
    if c.recipe == "dpo":
        if family.dpo_objective is None:
            raise TrainingError(f"recipe 'dpo' is not available for {c.family} (the official code has DPO for "
                                "CogVideoX only)")
        return family.dpo_objective(c, model_cfg)
    raise TrainingError(f"unknown recipe {c.recipe!r} (one of: sft, dpo)")


def lora_alpha(c) -> float:
    return c.lora.alpha or float(c.lora.rank)


def trainable_split(c, params, cfg):
    """(trainable, frozen, combine): the expert (+ `unfreeze`) and the rest, or with lora.rank > 0 LoRA
    factors on `lora.targets` and every weight frozen; `combine` rebuilds the objective's params."""
    if c.lora.rank:
        if c.unfreeze:
            raise TrainingError(f"unfreeze={c.unfreeze!r} has no effect with lora.rank={c.lora.rank} (only the LoRA "
                                "factors train)")
        if not c.lora.targets:
            raise TrainingError("lora.rank > 0 needs lora.targets, a regex over parameter paths, e.g. "
                                "'blocks/attn/(to_q|to_k|to_v|to_out)/kernel'")
        factors = lora.init(params, c.lora.targets, c.lora.rank, jax.random.key(c.seed))
        combine = training.dpo_combine if c.recipe == "dpo" else training.lora_combine
        return factors, params, combine(lora_alpha(c))
    if c.recipe == "dpo":
        raise TrainingError("recipe 'dpo' trains LoRA factors: set lora.rank (official: 32, alpha 32)")
    # The config's regex, and what the model's structure trains beyond the expert (e.g. a single-branch finetune).
    unfreeze = "|".join(filter(None, (c.unfreeze, families.get(c.family).unfreeze(cfg))))
    trainable, frozen = training.split_params(params, unfreeze)
    if not jax.tree.leaves(trainable):
        raise TrainingError(f"nothing to train: the model has no expert; convert with "
                            f"{families.get(c.family).convert_hint}")
    return trainable, frozen, vtree.merge


def fp32_master(c) -> bool:
    """optimizer.fp32_master: float32 master copies of the trainable weights (the expert, or what a
    single-branch ablation trains). LoRA factors (lora.rank > 0) are float32 in any case."""
    return bool(c.optimizer.get("fp32_master", False)) and not c.lora.rank


def setup(c):
    """(model config, mesh, sharded train state, sharded frozen params, step function)."""
    cfg, params = load_model(c)
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    objective = make_objective(c, cfg)
    trainable, frozen, combine = trainable_split(c, params, cfg)
    cast = None
    if fp32_master(c):  # float32 masters of the trainable weights; the model computes with param_dtype copies
        trainable, cast = training.master_cast(jnp.float32)(trainable), training.master_cast(c.model_options.param_dtype)
    frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
    # LoRA factors are small: replicated.
    trainable = jax.device_put(trainable, sharding.replicated(mesh) if c.lora.rank else
                               sharding.param_shardings(trainable, mesh))
    tx = training.make_optimizer(c.optimizer)
    state = jax.jit(lambda p: training.init_state(p, tx))(trainable)  # moments inherit the param shardings
    lr = training.learning_rate(c.optimizer)
    step_fn = training.make_train_step(objective, tx, lambda s: lr(s // c.optimizer.grad_accum),  # lr per optimizer step
                                       combine, cast)
    return cfg, mesh, state, frozen, step_fn


class ShardedStep:
    """The jitted train step, traced (and run) under the mesh's activation-sharding rules
    (`sharding.use_rules`): the model's `constrain` calls split the batch of every layer's activations
    over data/fsdp and the heads over tensor, as the README describes, instead of leaving their layout
    to XLA's propagation."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with sharding.use_rules(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with sharding.use_rules(self.mesh):
            return self.jitted.lower(*args)


def current_weights(c, trainable, frozen, mesh):
    """The transformer weights a sample uses now: the union, or the frozen weights with the LoRA factors
    beside their kernels (DPO: the policy), with the training shardings (no copy: the union already has
    them; no device holds the whole transformer)."""
    if fp32_master(c):
        trainable = training.master_cast(c.model_options.param_dtype)(trainable)
    if c.lora.rank:  # the frozen weights and the (replicated) factors keep the placement training gave them
        return lora.attach(frozen, trainable, lora_alpha(c))
    params = vtree.merge(trainable, frozen)
    return jax.device_put(params, sharding.param_shardings(params, mesh))


def make_validator(c, model_cfg, writer, mesh) -> validation.Validator | None:
    """Samples of validation.file every validation.every steps, with the encoders of validation.pipeline
    (a converted pipeline folder; its transformer weights are replaced by the run's) or, for random-weight
    runs, a pipeline built from validation.model (a sample config's `model` section whose transformer is
    this run's model). The denoising loop runs on the training mesh with the training shardings, on every
    process (each takes part in the sharded computation; each process's encoders run on its first local
    device); process 0 writes the samples."""
    v = c.validation
    if not v.every:
        return None
    if not v.file:
        raise TrainingError("validation.every > 0 needs validation.file=<validation.json in the official layout>")
    family = families.get(c.family)
    cases, settings = validation.read_cases(v.file, v.max_samples, v.score_threshold)
    if v.steps:
        settings["steps"] = v.steps
    settings.update(v.request.to_dict())   # other Request fields, e.g. guidance_scale, max_sequence_length
    at = Placement(mesh=mesh)  # the parameter rules of training: the run's weights fit without a copy
    if v.pipeline:
        pipe = family.pipeline.load(v.pipeline, dtype=c.model_options.dtype, placement=at)
    elif v.get("model") is not None:
        pipe = family.pipeline.random_from_config(v.model, dtype=c.model_options.dtype, placement=at)
    else:
        raise TrainingError("validation needs validation.pipeline=<converted pipeline folder> (its VAE and text "
                            "encoder)")
    if pipe.transformer.config.expert_layers != model_cfg.expert_layers or \
            jax.tree.map(np.shape, pipe.transformer.params) != jax.tree.map(np.shape, load_shapes(c, model_cfg)):
        raise TrainingError("validation.pipeline's transformer is not this run's model (other sizes or expert layers)")
    return validation.Validator(pipe, family.request, cases, settings, os.path.join(c.workdir, "samples"), writer,
                                write=jax.process_index() == 0)


def load_shapes(c, model_cfg):
    return families.get(c.family).param_shapes(model_cfg)


def export_lora(c, model_cfg, factors) -> str:
    """<workdir>/<lora.export>: the trained factors as a diffusers/PEFT LoRA file."""
    path = os.path.join(c.workdir, c.lora.export)
    names = module_names(families.get(c.family).transformer_kind, model_cfg)
    lora.export(path, jax.tree.map(np.asarray, factors), lora_alpha(c), names)
    return path


def checkpoints(c, model_cfg):
    """The run's training checkpoints in <workdir>/checkpoints; a resume must match the model config
    (all but RESUMABLE_OPTIONS) and the state tree."""
    model = {k: v for k, v in model_cfg.to_dict().items() if k not in RESUMABLE_OPTIONS}
    return training.TrainCheckpoints(os.path.join(c.workdir, "checkpoints"), every=c.checkpoint_every, keep=c.keep,
                                     model=model, async_save=c.async_checkpoint)


def train(c, stop: StopRequest | None = None):
    """Run (or resume) training; returns (this run's per-step metrics, final state, frozen params).
    Process 0 also appends the metrics to <workdir>/metrics.jsonl and TensorBoard events to <workdir>/tb.
    `stop` (the SIGINT handler): once it is requested, the run checkpoints after the current step and
    raises `Interrupted`."""
    main = jax.process_index() == 0
    cfg, mesh, state, frozen, step_fn = setup(c)
    data, empty_text = make_data(c, cfg)
    ckpt = checkpoints(c, cfg)
    try:
        restored = ckpt.restore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                             state))
    except training.CheckpointError:
        ckpt.close()
        raise
    if restored:
        step0, state, data_state = restored
        data.set_state(data_state)
        if main:
            print(f"resumed from step {step0}", flush=True)

    rep = sharding.replicated(mesh)
    rng = jax.device_put(jax.random.PRNGKey(c.seed), rep)
    empty_text = jax.device_put(jnp.asarray(empty_text), rep)
    first = next(data)  # after restoring the data state: the batch of the first step to run
    batch_shardings = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in first.items()}
    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    jstep = ShardedStep(jax.jit(step_fn, in_shardings=(state_shardings, jax.tree.map(lambda a: a.sharding, frozen),
                                                       batch_shardings, rep, rep),
                                out_shardings=(state_shardings, rep), donate_argnums=(0,)), mesh)

    tokens = families.get(c.family).sequence_length(cfg, first)   # per sample, both streams
    config_dict = json.loads(c.to_json())
    start = int(state.step)
    sink = MetricsSink(c, enabled=main, start=start)
    validate = make_validator(c, cfg, sink.writer, mesh)
    history, window, t_last = [], [], time.time()
    bar = tqdm(total=c.steps, initial=start, desc="training", unit="step", disable=not main or not c.progress)
    for step in range(start, c.steps):
        local, first = (first, None) if first is not None else (next(data), None)
        batch = {k: jax.make_array_from_process_local_data(batch_shardings[k], np.asarray(v)) for k, v in local.items()}
        state, m = jstep(state, frozen, batch, rng, empty_text)
        m = {k: float(v) for k, v in m.items()}
        if stop is not None:
            stop.graceful = True    # compiled and run: from now on a Ctrl-C ends the run after a step
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
            ckpt.wait()
            raise TrainingError(f"non-finite loss {m['loss']} / grad norm {m['grad_norm']} at step {step}; "
                                f"stopping without saving (last good checkpoint: {ckpt.manager.latest_step()})")
        m["step"] = step
        history.append(m)
        window.append(m)
        sink.step(m)
        bar.update(1)
        done = step + 1
        stopping = stop is not None and stop.requested
        ckpt.save(done, state, data.get_state(), config_dict, force=done == c.steps or stopping)
        if validate and (done % c.validation.every == 0 or done == c.steps):
            t_val = time.time()
            written = validate(done, current_weights(c, state.params, frozen, mesh))
            if main:
                tqdm.write(f"step {done}: validation wrote {len(written)} samples to {os.path.dirname(written[0])} "
                           f"({time.time() - t_val:.1f}s)")
            t_last += time.time() - t_val   # throughput excludes validation
        if done % c.log_every == 0 or done == c.steps:
            dt, n = time.time() - t_last, len(window)
            extra = {k: np.mean([w[k] for w in window]) for k in m if k not in ("loss", "grad_norm", "lr", "step")}
            sink.summary(done, {"loss": np.mean([w["loss"] for w in window]), "grad_norm": m["grad_norm"],
                                "lr": m["lr"], **extra, "steps/s": n / dt, "samples/s": n * c.batch_size / dt,
                                "tokens/s": n * c.batch_size * tokens / dt})
            window, t_last = [], time.time()
        if stopping:
            break
    bar.close()
    ckpt.wait()
    ckpt.close()
    if stop is not None and stop.requested and int(state.step) < c.steps:
        sink.close()
        raise Interrupted(f"interrupted after step {int(state.step)} (checkpoint written; the same command "
                          "resumes)")
    if c.lora.rank and main:
        print(f"wrote {export_lora(c, cfg, state.params)}", flush=True)
    sink.close()
    return history, state, frozen


def main(argv):
    del argv
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    logging.set_verbosity(logging.WARNING)
    c = flags.FLAGS.config
    stop = StopRequest()
    signal.signal(signal.SIGINT, stop)
    compile_cache.enable()  # a restarted run compiles in seconds; VAPJAX_NO_COMPILE_CACHE=1 turns it off
    try:
        check_paths(c)
        maybe_initialize_distributed()
        try:
            os.makedirs(c.workdir, exist_ok=True)
        except OSError as e:
            raise UsageError(f"workdir {c.workdir}: {e.strerror}") from None
        train(c, stop)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # Defined here, not at import: tests import this module beside sample.py, which has its own --config.
    cli.run(main, "training config, e.g. configs/cog_vap_train.py")
