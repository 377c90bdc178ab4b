"""Train the VAP expert on CogVideoX-5B-I2V, the official single-node recipe (spec §7.2):
AdamW β (0.9, 0.99), ε 1e-8, weight decay 1e-4, clip 1.0, lr 1e-5 constant after 1000 warmup steps,
60k steps, caption dropout 0.02, experts on layers 0–40, one reference, batch 1 per GPU × 8 GPUs.

    python -m convert CogVideoX-5b-I2V/transformer ckpt/init --init-expert copy --expert-layers 0-40
    python -m vapjax.data.precompute ...            # VAP-Data -> latents (see README)
    python train.py --config configs/cog_vap_train.py --config.init_checkpoint=ckpt/init \
        --config.data.dir=data/vap_latents --config.workdir=runs/vap
"""
import ml_collections

COGVIDEOX_SCHEDULER = dict(
    _class_name="CogVideoXDDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
    snr_shift_scale=1.0, steps_offset=0, timestep_spacing="trailing", clip_sample=False)


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "cogvideox"          # vapjax.families: model, objective, data format
    c.workdir = "runs/cog_vap"
    c.init_checkpoint = ""          # converted transformer (backbone + expert); referenced, never copied
    c.random_init = False
    # Architecture fields over the checkpoint's (every field with random_init), e.g. the paper's ablations
    # (vapjax.models.cogvideox STRUCTURES, REF_ROPES, expert_layer_preset): structure="residual_addition",
    # ref_rope="identical", expert_layers="first_half", or structure="single_branch_lora", lora_rank=64,
    # expert_layers=() (a stock checkpoint: python -m convert CogVideoX-5b-I2V/transformer OUT).
    c.model = ml_collections.ConfigDict()
    # bf16 weights and compute as the official trainer; per-layer full rematerialisation.
    c.model_options = ml_collections.ConfigDict(dict(dtype="bfloat16", param_dtype="bfloat16", attention="",
                                                     remat="full"))
    c.unfreeze = ""                 # regex over parameter paths to train beyond the expert (ablations)
    c.recipe = "sft"                # "sft" (the objective of spec §7.3/§7.4) or "dpo" (§7.8, CogVideoX)
    # LoRA (rank > 0): only low-rank factors of the Linear kernels whose path matches `targets` train
    # (everything else, the expert included, is frozen); exported to <workdir>/<export> for diffusers.
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets="", export="lora.safetensors"))
    c.dpo = ml_collections.ConfigDict(dict(beta=500.0))   # the official trainer's β (scale term −β/2)
    c.seed = 42
    c.steps = 60_000
    c.batch_size = 8                # global
    c.caption_dropout = 0.02
    # Ablation, the official reference_train_mode="reference_independent" (needs model.ref_head=True): each
    # reference noised to its own t_ref from the lowest `ref_noise_steps` timesteps (official
    # num_ref_diffusion_time_sigmas; its default 0 means t_ref = 999), plus a reference loss ×0.6/num_refs on
    # the expert head's prediction. ref_noise_adaln (official random_refer_noise): t_ref drives the expert's adaLN.
    c.ref_noise = False
    c.ref_noise_steps = 1000
    c.ref_noise_adaln = False
    c.scaling_factor = 0.7
    c.scheduler = ml_collections.ConfigDict(COGVIDEOX_SCHEDULER)
    # fp32_master: float32 master copies of the trainable weights (compute stays in param_dtype, bf16). The
    # official trainer keeps the expert in bf16 with no master copy (finetrainers sft_trainer/trainer.py:
    # 214-222, its fp32 cast commented out), so the default matches it, though a bf16 weight drops most
    # Adam-sized updates at lr 1e-5. Cost: 2 more bytes per trainable parameter, divided over the FSDP
    # shards (mesh.fsdp; gradients stay bf16): CogVideoX expert 5.435 B -> +10.9 GB in all (+1.36 GB per GPU
    # on 8), Wan expert d10 4.279 B -> +8.6 GB, d20 8.318 B -> +16.6 GB, all 16.395 B -> +32.8 GB.
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-5, warmup_steps=1000, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=1e-4,
        grad_clip=1.0, fp32_moments=True, fp32_master=False, grad_accum=1))
    # kind: "latents" (python -m vapjax.data.precompute), "raw" (vap_data, encoded on the fly with the VAE
    # and T5 of `pipeline`), or "synthetic" (RandomLatents of `size` examples, for smoke tests).
    # num_refs references per sample; mask_ref_ratio > 0 trains with N = 1 + Binomial(num_refs − 1,
    # 1 − ratio) of them per step (multi-reference SFT, vapjax.data.ref_dropout). allow_fewer_refs: a clip
    # with fewer than num_refs references trains with those (the step's N capped), else it is an error.
    c.data = ml_collections.ConfigDict(dict(kind="latents", dir="", pipeline="", num_refs=1, mask_ref_ratio=0.0,
                                            allow_fewer_refs=False, seed=42, worker_count=4, size=0))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # Every `every` steps (0: off), sample `max_samples` cases of `file` (official validation.json layout)
    # with `steps` denoising steps (0: the file's) using the encoders of `pipeline`; mp4s go to
    # <workdir>/samples/step_N/ and TensorBoard. Official: every 200 steps (100 for DPO).
    c.validation = ml_collections.ConfigDict(dict(every=0, file="", pipeline="", max_samples=2, steps=0,
                                                  score_threshold=70.0, model=None,
                                                  request=ml_collections.ConfigDict()))  # Request overrides
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep = 3
    c.async_checkpoint = True
    c.tensorboard = True
    c.progress = True
    return c
