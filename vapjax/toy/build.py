"""Trains the VAP-Toy default from scratch with the project's own models and trainer.

    python -m vapjax.toy.build --config configs/toy_build.py                  # all stages
    python -m vapjax.toy.build --config configs/toy_build.py --config.stages=expert   # one stage again

Stages (each writes its result to the workdir, and a later run skips what is done):
  tokenizer  a sentencepiece word model over the caption vocabulary
  vae        a tiny CogVideoX VAE (the same module as the 5B's) on toy clips
  oracle     the condition reader (vapjax.toy.oracle), on ground-truth clips and their VAE round trips
  encode     the training pool (seen conditions on training scenes) through the VAE
  backbone   a tiny CogVideoX-I2V (and its T5) pretrained on toy image-to-video with full captions
  expert     the VAP expert: backbone frozen, expert initialised as its copy (the paper's recipe),
             trained on pairs by `vapjax.training` with the effect words stripped from the target
             caption and (expert.ref_caption "stripped", the default) from the reference caption, so
             only the reference video can carry the semantics
  export     the converted pipeline folder + oracle, read by `configs/toy_vap.py`
Progress goes to TensorBoard under <workdir>/tb.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vapjax import checkpoint, training
from vapjax import tree as vtree
from vapjax.models import cogvideox, cogvideox_vae, t5
from vapjax.sampling import DDIMSchedule
from vapjax.tokenizer import T5Tokenizer
from vapjax.toy import evaluate
from vapjax.toy import oracle as oracle_lib
from vapjax.toy import world

STAGES = ("tokenizer", "vae", "oracle", "encode", "backbone", "expert", "export")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Writer:
    """TensorBoard scalars (tensorboardX), or nothing where it is not installed."""

    def __init__(self, logdir: str):
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional)
            self._w = SummaryWriter(logdir)
        except ImportError:
            self._w = None

    def add_scalar(self, tag, value, step):
        if self._w is not None:
            self._w.add_scalar(tag, value, step)

    def flush(self):
        if self._w is not None:
            self._w.flush()


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def caption_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Captions of every condition (and stripped ones) over random scenes of both splits."""
    rng = np.random.default_rng(seed)
    names = [None, *world.CONDITIONS]
    return [world.caption(world.sample_scene(rng, "train" if i % 5 else "heldout"), names[i % len(names)])
            for i in range(n)]


def build_tokenizer(out: str) -> None:
    import io  # noqa: PLC0415
    import sentencepiece as spm  # noqa: PLC0415
    os.makedirs(out, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(caption_corpus()), model_writer=model,
                                   model_type="word", vocab_size=256, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                   minloglevel=2)
    with open(os.path.join(out, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"extra_ids": 0, "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                   "model_max_length": 32}, f, indent=1)


# ---------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Pool:
    """Ground-truth clips of the seen conditions on training scenes, with their captions."""
    clips: np.ndarray          # uint8 [N, F, H, W, 3]
    conditions: np.ndarray     # int32 [N], index into world.SEEN
    captions: list[str]        # full (scene + effect)
    stripped: list[str]        # scene only

    @classmethod
    def render(cls, per_condition: int, seed: int) -> "Pool":
        rng = np.random.default_rng(seed)
        n = per_condition * len(world.SEEN)
        clips = np.empty((n, world.FRAMES, world.HEIGHT, world.WIDTH, 3), np.uint8)
        conds = np.arange(n, dtype=np.int32) % len(world.SEEN)
        caps, stripped = [], []
        for i in range(n):
            scene = world.sample_scene(rng, "train")
            name = world.SEEN[conds[i]]
            clips[i] = world.render(scene, name, seed=int(rng.integers(2 ** 31)))
            caps.append(world.caption(scene, name))
            stripped.append(world.caption(scene, name, strip_effect=True))
        return cls(clips, conds, caps, stripped)


def to_unit(clips) -> jax.Array:
    """uint8 clips -> [-1, 1] float32 (the VAE's input range)."""
    return jnp.asarray(clips, jnp.float32) / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------

def train_vae(c, pool: Pool, writer: Writer) -> tuple[cogvideox_vae.VAEConfig, dict]:
    """A tiny CogVideoX VAE trained on random crops of pool clips, in the phases of `c.vae.phases` (each its
    own steps, learning rate, chroma weight and gradient clip, a fresh optimizer). The scaling factor is
    then set so that scaled latents have unit variance."""
    cfg = cogvideox_vae.VAEConfig(**c.vae.model.to_dict(), sample_height=world.HEIGHT, sample_width=world.WIDTH)
    vae = cogvideox_vae.AutoencoderKLCogVideoX(cfg)
    params = cogvideox_vae.init_params(cfg, jax.random.PRNGKey(c.seed))
    done = 0
    for phase in c.vae.phases:
        phase = SimpleNamespace(**dict(phase))
        params = _vae_phase(c, vae, params, phase, pool, writer, done)
        done += phase.steps
    # Unit-variance scaled latents (the role of CogVideoX's 0.7).
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mean)
    z = np.concatenate([np.asarray(encode(params, to_unit(pool.clips[i:i + 8]))) for i in range(0, 64, 8)])
    cfg = dataclasses.replace(cfg, scaling_factor=float(round(1.0 / z.std(), 4)))
    log(f"vae: latent std {z.std():.3f} -> scaling_factor {cfg.scaling_factor}")
    return cfg, params


def _vae_phase(c, vae, params, phase, pool: Pool, writer: Writer, offset: int):
    sched = optax.warmup_cosine_decay_schedule(0, phase.lr, min(50, phase.steps // 4), max(phase.steps, 2), phase.lr / 20)
    tx = optax.chain(optax.clip_by_global_norm(phase.grad_clip), optax.adam(sched))
    opt = tx.init(params)

    def loss_fn(p, x):
        # Decoded from the posterior mean: at initialisation the posterior's unit variance drowns the mean,
        # and a decoder trained on samples learns to ignore its input. The variance is instead pushed
        # down directly, so that the posterior draws of training later stay close to the mean.
        post = vae.apply({"params": p}, x, method="encode")
        y = vae.apply({"params": p}, post.mean, method="decode")
        rec = jnp.mean(jnp.abs(y - x)) + jnp.mean(jnp.square(y - x))
        # Chroma (each channel minus the pixel's mean) weighted up: luminance dominates the plain error,
        # and a short training otherwise reconstructs grey videos.
        chroma = lambda v: v - v.mean(-1, keepdims=True)  # noqa: E731
        rec = rec + phase.chroma_weight * jnp.mean(jnp.abs(chroma(y) - chroma(x)))
        kl = 0.5 * jnp.mean(jnp.square(post.mean) + jnp.exp(post.logvar) - 1 - post.logvar)
        return rec + c.vae.kl_weight * kl + c.vae.variance_weight * jnp.mean(jnp.exp(post.logvar)), rec

    @jax.jit
    def step(p, opt, x):
        (loss, rec), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, loss, rec

    rng = np.random.default_rng(c.seed)
    ch, cw = c.vae.crop
    t0 = time.time()
    for i in range(phase.steps):
        idx = rng.integers(0, len(pool.clips), c.vae.batch)
        y0, x0 = rng.integers(0, world.HEIGHT - ch + 1, 1)[0] // 8 * 8, rng.integers(0, world.WIDTH - cw + 1, 1)[0] // 8 * 8
        params, opt, loss, rec = step(params, opt, to_unit(pool.clips[idx, :, y0:y0 + ch, x0:x0 + cw]))
        if i % 50 == 0 or i == phase.steps - 1:
            log(f"vae step {offset + i}: loss {float(loss):.4f} rec {float(rec):.4f} ({time.time() - t0:.0f}s)")
            writer.add_scalar("vae/reconstruction", float(rec), offset + i)
    return params


def vae_roundtrip(path: str):
    """clips -> their VAE reconstructions (posterior mean, decoded), uint8."""
    vcfg, vparams = checkpoint.load(path, "cogvideox_vae")
    vae = cogvideox_vae.AutoencoderKLCogVideoX(vcfg)
    rt = jax.jit(lambda p, x: vae.apply({"params": p}, vae.apply({"params": p}, x, method="encode").mean,
                                        method="decode"))

    def roundtrip(clips, batch=8):
        out = [jnp.round(jnp.clip(rt(vparams, to_unit(clips[i:i + batch])) * 127.5 + 127.5, 0, 255))
               for i in range(0, len(clips), batch)]
        return np.concatenate([np.asarray(o) for o in out]).astype(np.uint8)
    return roundtrip


# ---------------------------------------------------------------------------------------------
# Encode, backbone, expert, export
# ---------------------------------------------------------------------------------------------

SCHEDULER = dict(  # CogVideoX-5B-I2V's (spec §5.1)
    _class_name="CogVideoXDDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
    snr_shift_scale=1.0, steps_offset=0, timestep_spacing="trailing", clip_sample=False)


def encode_clips(vcfg, vparams, clips: np.ndarray, batch: int = 8) -> np.ndarray:
    """Posterior parameters (mean ‖ logvar) [N, f, h, w, 2C] of uint8 clips."""
    vae = cogvideox_vae.AutoencoderKLCogVideoX(vcfg)
    enc = jax.jit(lambda p, x: jnp.concatenate(vae.apply({"params": p}, x, method="encode"), axis=-1))
    return np.concatenate([np.asarray(enc(vparams, to_unit(clips[i:i + batch]))) for i in range(0, len(clips), batch)])


def stage_encode(c, paths, get_pool, writer) -> None:
    pool = get_pool()
    vcfg, vparams = checkpoint.load(paths["vae"], "cogvideox_vae")
    t = time.time()
    latents = encode_clips(vcfg, vparams, pool.clips)
    images = encode_clips(vcfg, vparams, pool.clips[:, :1])
    tok = T5Tokenizer.from_folder(paths["tokenizer"])
    # Reconstruction quality of the posterior mean, on the first clips.
    vae = cogvideox_vae.AutoencoderKLCogVideoX(vcfg)
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))
    n = latents.shape[-1] // 2
    rec = np.asarray(jnp.clip((dec(vparams, jnp.asarray(latents[:16, ..., :n])) + 1) * 127.5, 0, 255)).round()
    quality = float(evaluate.psnr(rec[None], pool.clips[None, :16])[0])
    log(f"encode: {len(latents)} clips in {time.time() - t:.0f}s, VAE reconstruction PSNR {quality:.2f} dB")
    writer.add_scalar("vae/psnr", quality, 0)
    np.savez(paths["encode"], latent_dist=latents, image_dist=images, conditions=pool.conditions,
             ids=tok(pool.captions, c.text_length), ids_stripped=tok(pool.stripped, c.text_length),
             empty_ids=tok([""], c.text_length), psnr=quality)


def transformer_config(c, vcfg, text_dim: int, expert_layers=()) -> cogvideox.CogVideoXConfig:
    spatial = 2 ** (len(vcfg.block_out_channels) - 1)
    return cogvideox.CogVideoXConfig(
        **c.transformer.to_dict(), in_channels=2 * vcfg.latent_channels, out_channels=vcfg.latent_channels,
        text_embed_dim=text_dim, sample_height=world.HEIGHT // spatial, sample_width=world.WIDTH // spatial,
        sample_frames=world.FRAMES, expert_layers=tuple(expert_layers))


def _optimizer(stage):
    import ml_collections  # noqa: PLC0415
    opt = ml_collections.ConfigDict(dict(learning_rate=stage.lr, warmup_steps=stage.warmup, beta1=0.9, beta2=0.99,
                                         eps=1e-8, weight_decay=1e-4, grad_clip=1.0, fp32_moments=False,
                                         grad_accum=1))
    return training.make_optimizer(opt), training.learning_rate(opt)


def stage_backbone(c, paths, get_pool, writer) -> None:
    """Toy CogVideoX-I2V pretraining: the transformer without expert and its T5, trained together on
    image-to-video with full captions (the v-prediction DDIM objective of vapjax.training)."""
    data = dict(np.load(paths["encode"]))
    vcfg, _ = checkpoint.load(paths["vae"], "cogvideox_vae")
    tok = T5Tokenizer.from_folder(paths["tokenizer"])
    t5cfg = t5.T5Config(**c.text_encoder.to_dict(), vocab_size=max(128, tok._sp.get_piece_size()))
    cfg = transformer_config(c, vcfg, t5cfg.d_model)
    model, encoder = cogvideox.CogVideoXTransformer(cfg), t5.T5Encoder(t5cfg)
    k1, k2 = jax.random.split(jax.random.PRNGKey(c.seed))
    params = {"transformer": cogvideox.init_params(cfg, k1), "text_encoder": t5.init_params(t5cfg, k2)}
    if c.backbone.init:  # continue from an earlier backbone stage (same architecture)
        for name, kind in (("transformer", "cogvideox_transformer"), ("text_encoder", "t5_encoder")):
            _, loaded = checkpoint.load(os.path.join(c.backbone.init, name), kind)
            if jax.tree.map(np.shape, loaded) != jax.tree.map(np.shape, params[name]):
                raise ValueError(f"backbone.init {c.backbone.init}: its {name} does not match this config's")
            params[name] = loaded
    alphas = DDIMSchedule.from_config(SCHEDULER).alphas_cumprod
    empty = jnp.asarray(data["empty_ids"])

    def objective(p, batch, rng):
        k_in, k_drop, k_t, k_noise = jax.random.split(rng, 4)
        kx, ki = jax.random.split(k_in)
        post = lambda d, k: cogvideox_vae.Posterior.from_concat(d).sample(k) * vcfg.scaling_factor  # noqa: E731
        x0, image = post(batch["latent_dist"], kx), post(batch["image_dist"], ki)
        drop = jax.random.uniform(k_drop, (x0.shape[0], 1)) < 0.1
        text = encoder.apply({"params": p["text_encoder"]}, jnp.where(drop, empty, batch["ids"]))
        cond = jnp.pad(image, ((0, 0), (0, x0.shape[1] - 1), (0, 0), (0, 0), (0, 0)))
        predict = lambda x_t, t: model.apply({"params": p["transformer"]}, jnp.concatenate([x_t, cond], -1), text, t)  # noqa: E731
        t = training.cogvideox_timesteps(k_t, x0.shape[0], len(alphas))
        return training.cogvideox_loss(predict, x0, jax.random.normal(k_noise, x0.shape), t, alphas)

    done = 0
    # Each phase: its own steps and learning rate, a fresh optimizer (warm-up, then constant) and the batch stream
    # from its start, so that a later phase equals a later run with `init` = the earlier phases' result.
    for phase in c.backbone.phases:
        phase = SimpleNamespace(**{"warmup": c.backbone.warmup, **phase})
        tx, _ = _optimizer(phase)

        @jax.jit
        def step(state, batch, rng, tx=tx):
            loss, g = jax.value_and_grad(objective)(state.params, batch, jax.random.fold_in(rng, state.step))
            u, opt = tx.update(g, state.opt_state, state.params)
            return training.TrainState(state.step + 1, optax.apply_updates(state.params, u), opt), loss

        state = jax.device_put(training.init_state(params, tx), jax.local_devices()[0])  # committed: one compile
        rng, key, t0, avg = np.random.default_rng(c.seed + 1), jax.random.PRNGKey(c.seed + 1), time.time(), []
        for i in range(phase.steps):
            idx = rng.integers(0, len(data["ids"]), c.backbone.batch)
            batch = {k: jnp.asarray(data[k][idx]) for k in ("latent_dist", "image_dist", "ids")}
            state, loss = step(state, batch, key)
            avg.append(float(loss))
            if i % 100 == 0 or i == phase.steps - 1:
                log(f"backbone step {done + i}: loss {np.mean(avg):.4f} (lr {phase.lr:g}, {time.time() - t0:.0f}s)")
                writer.add_scalar("backbone/loss", float(np.mean(avg)), done + i)
                avg = []
        params, done = state.params, done + phase.steps
    checkpoint.save(os.path.join(paths["backbone"], "transformer"), params["transformer"], cfg)
    checkpoint.save(os.path.join(paths["backbone"], "text_encoder"), params["text_encoder"], t5cfg)


def expert_from_backbone(params: dict, cfg: cogvideox.CogVideoXConfig) -> dict:
    """The paper's initialisation: every expert weight a copy of its backbone counterpart (its layer's,
    for the blocks), as `python -m convert --init-expert copy` does for a stock checkpoint."""
    backbone = params["backbone"]
    layers = np.asarray(cfg.expert_layers)
    expert = {k: v for k, v in backbone.items() if k != "head"}
    expert["blocks"] = jax.tree.map(lambda a: a[layers], backbone["blocks"])
    return {"backbone": backbone, "expert": expert}


def text_embeddings(t5cfg, t5params, ids: np.ndarray, batch: int = 256) -> np.ndarray:
    enc = jax.jit(lambda p, i: t5.T5Encoder(t5cfg).apply({"params": p}, i))
    return np.concatenate([np.asarray(enc(t5params, jnp.asarray(ids[i:i + batch]))) for i in range(0, len(ids), batch)])


def same_condition_references(conditions: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each target clip index, another pool clip of the same condition: a VAP training pair."""
    by_condition = [np.flatnonzero(conditions == k) for k in range(conditions.max() + 1)]
    return np.array([rng.choice(by_condition[conditions[j]][by_condition[conditions[j]] != j]) for j in targets])


def train_expert(c, paths, *, model: dict | None = None, seed: int | None = None, steps: int | None = None,
                 writer: Writer | None = None, tag: str = "expert") -> tuple[cogvideox.CogVideoXConfig, dict]:
    """VAP on the toy backbone: the backbone (and T5) frozen, the expert on every layer initialised as the
    backbone's copy, trained by vapjax.training's step and CogVideoX objective on pairs (one condition on
    two training scenes); the target caption has its effect words stripped, the reference caption too
    where `c.expert.ref_caption` is "stripped". `model` overrides model config fields (the ablation
    switches of vapjax.models.cogvideox); the trainable set is the expert and LoRA partitions plus what
    the structure unfreezes."""
    data = dict(np.load(paths["encode"]))
    vcfg, _ = checkpoint.load(paths["vae"], "cogvideox_vae")
    bcfg, bparams = checkpoint.load(os.path.join(paths["backbone"], "transformer"), "cogvideox_transformer")
    t5cfg, t5params = checkpoint.load(os.path.join(paths["backbone"], "text_encoder"), "t5_encoder")
    overrides = dict(model or {})
    layers = overrides.pop("expert_layers", "all_layers")
    layers = (tuple(range(bcfg.num_layers)) if layers == "all_layers"
              else cogvideox.expert_layer_preset(layers, bcfg.num_layers))
    cfg = bcfg.with_options(expert_layers=layers, **overrides)
    shapes = cogvideox.param_shapes(cfg)
    params = {"backbone": bparams["backbone"]}
    if "expert" in shapes:
        params = expert_from_backbone(params, cfg)
    if "lora" in shapes:  # the model's own LoRA initialisation (B = 0): it starts as the backbone
        params["lora"] = cogvideox.init_params(cfg, jax.random.PRNGKey(c.seed))["lora"]
    want = jax.tree.map(lambda s: s.shape, shapes)
    assert jax.tree.map(lambda a: a.shape, params) == want, "initial parameters do not match the model's tree"
    text, stripped = text_embeddings(t5cfg, t5params, data["ids"]), text_embeddings(t5cfg, t5params, data["ids_stripped"])
    empty = jnp.asarray(text_embeddings(t5cfg, t5params, data["empty_ids"])[0])
    # "stripped": the reference caption loses its effect words too, so only the reference *video* can
    # carry the semantics (with "full" the expert can learn to read the caption instead of the video).
    if c.expert.ref_caption not in evaluate.REF_CAPTIONS:
        raise ValueError(f"expert.ref_caption must be one of {evaluate.REF_CAPTIONS}, got {c.expert.ref_caption!r}")
    ref_captions = {"full": text, "stripped": stripped}[c.expert.ref_caption]
    alphas = DDIMSchedule.from_config(SCHEDULER).alphas_cumprod
    objective = training.cogvideox_objective(cogvideox.CogVideoXTransformer(cfg), alphas,
                                             scaling_factor=vcfg.scaling_factor,
                                             caption_dropout=c.expert.caption_dropout, dtype=jnp.float32)
    tx, lr = _optimizer(c.expert)
    trainable, frozen = training.split_params(params, cogvideox.structure_unfreeze(cfg))
    # Committed to the device as the step's outputs are, so that its second call does not compile again.
    state, frozen = jax.device_put((training.init_state(trainable, tx), frozen), jax.local_devices()[0])
    step = jax.jit(training.make_train_step(objective, tx, lr))
    conds = data["conditions"]
    seed = c.seed if seed is None else seed
    rng, key, t0, avg = np.random.default_rng(seed + 2), jax.random.PRNGKey(seed + 2), time.time(), []
    steps = c.expert.steps if steps is None else steps
    for i in range(steps):
        tgt = rng.integers(0, len(conds), c.expert.batch)
        ref = same_condition_references(conds, tgt, rng)
        batch = dict(latent_dist=data["latent_dist"][tgt], image_dist=data["image_dist"][tgt],
                     ref_latent_dist=data["latent_dist"][ref][:, None], ref_image_dist=data["image_dist"][ref][:, None],
                     text=stripped[tgt], ref_text=ref_captions[ref][:, None])
        state, metrics = step(state, frozen, jax.tree.map(jnp.asarray, batch), key, empty)
        avg.append(float(metrics["loss"]))
        if i % 100 == 0 or i == steps - 1:
            log(f"{tag} step {i}: loss {np.mean(avg):.4f} ({time.time() - t0:.0f}s)")
            if writer is not None:
                writer.add_scalar(f"{tag}/loss", float(np.mean(avg)), i)
            avg = []
    return cfg, vtree.merge(state.params, frozen)


def stage_expert(c, paths, get_pool, writer) -> None:
    cfg, params = train_expert(c, paths, writer=writer)
    checkpoint.save(os.path.join(paths["expert"], "transformer"), params, cfg)


def write_demo(out: str, condition: str, seed: int, ref_caption: str = "full") -> None:
    """The bundled demo: a held-out-scene target image, a reference clip of `condition` on another scene,
    and their captions (the target's stripped of its effect words; the reference's too where the expert
    was trained with `ref_caption` "stripped"), read by configs/toy_vap.py."""
    from vapjax import video  # noqa: PLC0415
    pair = world.pairs("heldout_scenes", 1, seed, conditions=[condition])[0]
    ref_prompt, caption = pair.captions(strip_effect=True, strip_reference=ref_caption == "stripped")
    video.write_video(os.path.join(out, "reference.mp4"), pair.reference_clip(), fps=8, quality=10)
    from PIL import Image  # noqa: PLC0415
    Image.fromarray(pair.target_clip()[0]).save(os.path.join(out, "image.png"))
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({"condition": condition, "prompt": caption, "ref_prompt": ref_prompt, "ref_caption": ref_caption},
                  f, indent=1)


def stage_export(c, paths, get_pool, writer) -> None:
    """The converted pipeline folder `<out>/pipeline` (as `python -m convert` writes one) and the oracle."""
    out = os.path.abspath(c.out)
    pipe = os.path.join(out, "pipeline")
    if os.path.exists(pipe):
        shutil.rmtree(pipe)
    for name, src in (("transformer", os.path.join(paths["expert"], "transformer")), ("vae", paths["vae"]),
                      ("text_encoder", os.path.join(paths["backbone"], "text_encoder")),
                      ("tokenizer", paths["tokenizer"])):
        shutil.copytree(src, os.path.join(pipe, name))
    os.makedirs(os.path.join(pipe, "scheduler"))
    with open(os.path.join(pipe, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=1)
    with open(os.path.join(pipe, "pipeline.json"), "w") as f:
        json.dump({"vapjax_pipeline": "CogVideoXImageToVideoMOTPipeline",
                   "components": ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]}, f, indent=1)
    shutil.copy(paths["oracle"], os.path.join(out, "oracle.npz"))
    write_demo(out, c.demo_condition, c.seed, c.expert.ref_caption)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    log(f"export: {out} ({size / 2 ** 20:.1f} MiB)")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def load_config(path: str):
    """The ConfigDict of a build config file (configs/toy_build.py), for the tools that take `--config`."""
    import importlib.util  # noqa: PLC0415
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    spec = importlib.util.spec_from_file_location("toy_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _done(path: str) -> bool:
    return os.path.exists(path)


def run(c) -> None:
    stages = STAGES if c.stages in ("", "all") else tuple(s.strip() for s in c.stages.split(","))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    forced = c.stages not in ("", "all")
    work = os.path.abspath(c.workdir)
    os.makedirs(work, exist_ok=True)
    writer = Writer(os.path.join(work, "tb"))
    paths = {s: os.path.join(work, s) for s in STAGES}
    paths["oracle"] = os.path.join(work, "oracle.npz")
    paths["encode"] = os.path.join(work, "encoded.npz")
    todo = lambda s: s in stages and (forced or not _done(paths[s]))  # noqa: E731
    pool = None

    def get_pool():
        nonlocal pool
        if pool is None:
            t = time.time()
            pool = Pool.render(c.pool_per_condition, c.seed)
            log(f"pool: {len(pool.clips)} clips rendered in {time.time() - t:.0f}s")
        return pool

    if todo("tokenizer"):
        build_tokenizer(paths["tokenizer"])
        log(f"tokenizer: {T5Tokenizer.from_folder(paths['tokenizer'])._sp.get_piece_size()} pieces")
    if todo("vae"):
        vcfg, vparams = train_vae(c, get_pool(), writer)
        checkpoint.save(paths["vae"], vparams, vcfg)
    if todo("oracle"):
        oracle, metrics = oracle_lib.train(steps=c.oracle.steps, batch=c.oracle.batch,
                                           train_clips=c.oracle.train_clips, test_clips=c.oracle.test_clips,
                                           roundtrip=vae_roundtrip(paths["vae"]),
                                           roundtrip_clips=c.oracle.roundtrip_clips, seed=c.seed, log=log,
                                           writer=writer)
        oracle.save(paths["oracle"])
        with open(os.path.join(work, "oracle_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    for stage in ("encode", "backbone", "expert", "export"):
        if todo(stage):
            globals()[f"stage_{stage}"](c, paths, get_pool, writer)
    writer.flush()


def main(argv):
    del argv
    from absl import flags  # noqa: PLC0415
    try:
        run(flags.FLAGS.config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from vapjax import cli  # noqa: PLC0415
    cli.run(main, "configs/toy_build.py")
