"""Train the VAP expert (CogVideoX backbone frozen) on one device, many devices or many hosts.

    python train.py --config configs/cog_vap_train_tiny.py                 # tiny, CPU, synthetic data
    python train.py --config configs/cog_vap_train.py --config.init_checkpoint=ckpt/init \
        --config.data.dir=vap_data_latents --config.workdir=runs/vap

Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under a cluster
manager JAX detects, e.g. SLURM) and start the same command on every host. Re-running the same command
resumes from the newest complete checkpoint in the workdir.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config, e.g. configs/cog_vap_train.py",
                                          lock_config=False)


class TrainingError(RuntimeError):
    """Stops training with a one-line message (non-finite loss, bad setup)."""


def maybe_initialize_distributed() -> None:
    import jax  # noqa: PLC0415
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()


def load_model(c):
    """(model config, full parameter tree) from a converted checkpoint or random tiny weights."""
    import jax  # noqa: PLC0415
    from vapjax.models import cogvideox  # noqa: PLC0415
    options = c.model_options.to_dict()
    options["attention"] = options.get("attention") or None
    if c.random_init:
        from vapjax.random_init import random_params  # noqa: PLC0415
        cfg = cogvideox.CogVideoXConfig(**c.model.to_dict(), **options)
        return cfg, random_params(cogvideox.param_shapes(cfg), c.seed)
    if not c.init_checkpoint:
        raise TrainingError("no init_checkpoint: pass --config.init_checkpoint=<converted transformer folder> "
                            "(python -m convert CogVideoX-5b-I2V/transformer OUT --init-expert copy --expert-layers 0-40)")
    from vapjax import checkpoint  # noqa: PLC0415
    cfg, params = checkpoint.load(c.init_checkpoint, "cogvideox_transformer")
    if not cfg.expert_layers:
        raise TrainingError(f"{c.init_checkpoint} has no expert; convert with --init-expert copy --expert-layers 0-40")
    params = jax.tree.map(lambda a: a.astype(options["param_dtype"]), params)
    return cfg.with_options(**options), params


def make_data(c, model_cfg):
    """(batch iterator with get_state/set_state, empty-caption embedding [L, D]) for data.kind
    'synthetic' (RandomLatents), 'latents' (precomputed vap_latents) or 'raw' (vap_data + encoders)."""
    import numpy as np  # noqa: PLC0415
    if c.data.kind == "synthetic":
        from vapjax.data.random_latents import RandomLatents  # noqa: PLC0415
        lat_h, lat_w = model_cfg.sample_height, model_cfg.sample_width
        data = RandomLatents(size=c.data.size, batch_size=c.batch_size, frames=model_cfg.latent_frames,
                             height=lat_h, width=lat_w, channels=model_cfg.out_channels,
                             text_len=model_cfg.max_text_seq_length, text_dim=model_cfg.text_embed_dim,
                             num_refs=c.data.num_refs, seed=c.data.seed)
        return data, data.empty_text
    import jax  # noqa: PLC0415
    from vapjax.data import loader  # noqa: PLC0415
    if c.batch_size % jax.process_count():
        raise TrainingError(f"batch_size {c.batch_size} does not split over {jax.process_count()} hosts")
    it = loader.make_loader(c.data.dir, kind=c.data.kind, batch_size=c.batch_size // jax.process_count(),
                            num_refs=c.data.num_refs, seed=c.data.seed, worker_count=c.data.worker_count)
    if c.data.kind == "latents":
        return it, loader.empty_text(c.data.dir)
    # Raw clips: encode with the pipeline's VAE and T5 on the fly (as the official trainer does).
    from vapjax.data.precompute import EncodedBatches, Encoders  # noqa: PLC0415
    if not c.data.pipeline:
        raise TrainingError("data.kind='raw' needs data.pipeline=<converted pipeline folder> for the VAE and T5")
    encoders = Encoders.load(c.data.pipeline, max_length=model_cfg.max_text_seq_length)
    return EncodedBatches(it, encoders), np.asarray(encoders.encode_text([""]), np.float32)[0]


class MetricsSink:
    """Process 0's outputs: every step to <workdir>/metrics.jsonl, summaries to stdout and TensorBoard."""

    def __init__(self, c, enabled: bool):
        self.file = open(os.path.join(c.workdir, "metrics.jsonl"), "a") if enabled else None
        self.writer = None
        if enabled and c.tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415
            self.writer = SummaryWriter(os.path.join(c.workdir, "tb"))

    def step(self, m: dict) -> None:
        if self.file:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()

    def summary(self, step: int, line: dict) -> None:
        if not self.file:
            return
        from tqdm import tqdm  # noqa: PLC0415
        tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in line.items()))
        if self.writer:
            for k, v in line.items():
                self.writer.add_scalar(k.replace("/", "_per_"), v, step)

    def close(self) -> None:
        for f in (self.file, self.writer):
            if f:
                f.close()


def setup(c):
    """(model config, mesh, sharded train state, sharded frozen params, step function)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from vapjax import sampling, sharding, training  # noqa: PLC0415
    from vapjax.models import cogvideox  # noqa: PLC0415

    cfg, params = load_model(c)
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    trainable, frozen = training.split_params(params, c.unfreeze)
    frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
    trainable = jax.device_put(trainable, sharding.param_shardings(trainable, mesh))
    tx = training.make_optimizer(c.optimizer)
    state = jax.jit(lambda p: training.init_state(p, tx))(trainable)  # moments inherit the param shardings
    objective = training.cogvideox_objective(
        cogvideox.CogVideoXTransformer(cfg), sampling.DDIMSchedule.from_config(c.scheduler.to_dict()).alphas_cumprod,
        scaling_factor=c.scaling_factor, caption_dropout=c.caption_dropout, dtype=jnp.dtype(cfg.dtype))
    lr = training.learning_rate(c.optimizer)
    step_fn = training.make_train_step(objective, tx, lambda s: lr(s // c.optimizer.grad_accum))  # lr per optimizer step
    return cfg, mesh, state, frozen, step_fn


def train(c):
    """Run (or resume) training; returns (this run's per-step metrics, final state, frozen params).
    Process 0 also appends the metrics to <workdir>/metrics.jsonl and TensorBoard events to <workdir>/tb."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415
    from vapjax import sharding, training  # noqa: PLC0415

    main = jax.process_index() == 0
    cfg, mesh, state, frozen, step_fn = setup(c)
    data, empty_text = make_data(c, cfg)
    ckpt = training.Checkpoints(os.path.join(c.workdir, "checkpoints"), every=c.checkpoint_every, keep=c.keep,
                                async_save=c.async_checkpoint)
    restored = ckpt.restore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state))
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
    jstep = jax.jit(step_fn, in_shardings=(state_shardings, jax.tree.map(lambda a: a.sharding, frozen),
                                           batch_shardings, rep, rep),
                    out_shardings=(state_shardings, rep), donate_argnums=(0,))

    tokens = (cfg.max_text_seq_length + cfg.latent_frames * cfg.sample_height * cfg.sample_width
              // cfg.patch_size ** 2) * (1 + c.data.num_refs)   # per sample, both streams
    config_dict = json.loads(c.to_json())
    sink = MetricsSink(c, enabled=main)
    history, window, t_last = [], [], time.time()
    start = int(state.step)
    bar = tqdm(total=c.steps, initial=start, desc="training", unit="step", disable=not main or not c.progress)
    for step in range(start, c.steps):
        local, first = (first, None) if first is not None else (next(data), None)
        batch = {k: jax.make_array_from_process_local_data(batch_shardings[k], np.asarray(v)) for k, v in local.items()}
        state, m = jstep(state, frozen, batch, rng, empty_text)
        m = {k: float(v) for k, v in m.items()}
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
        ckpt.save(done, state, data.get_state(), config_dict, force=done == c.steps)
        if done % c.log_every == 0 or done == c.steps:
            dt, n = time.time() - t_last, len(window)
            sink.summary(done, {"loss": np.mean([w["loss"] for w in window]), "grad_norm": m["grad_norm"],
                                "lr": m["lr"], "steps/s": n / dt, "samples/s": n * c.batch_size / dt,
                                "tokens/s": n * c.batch_size * tokens / dt})
            window, t_last = [], time.time()
    bar.close()
    ckpt.wait()
    ckpt.close()
    sink.close()
    return history, state, frozen


def main(argv):
    del argv
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    logging.set_verbosity(logging.WARNING)
    c = _CONFIG.value
    try:
        maybe_initialize_distributed()
        os.makedirs(c.workdir, exist_ok=True)
        train(c)
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
