"""Train the VAP expert on Wan2.1-I2V-14B, the official single-node recipe (spec §7.2, EX-W/train_single_node.sh):
AdamW β (0.9, 0.99), ε 1e-8, weight decay 1e-4, clip 1.0, lr 1e-5 constant after 2000 warmup steps, 60k
steps, caption dropout 0.02, experts on every 2nd layer (config_ori_d_20.json: 0, 2, …, 38), one
reference, 49 frames at 480×832, references with alignment score > 10, batch 1 per GPU × 8 GPUs, the
whole transformer in bf16 with per-layer full rematerialisation. Flow matching (spec §7.4): logit-normal
σ, the reference at timestep 1.

    python -m convert Wan2.1-I2V-14B-480P-Diffusers/transformer ckpt/wan_init --init-expert copy \
        --expert-layers 0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30,32,34,36,38
    python -m vapjax.data.vap_data --manual_dir VAP-Data --data_dir data --config 49x480x832_score10
    python -m vapjax.data.precompute --data_dir data/vap_data/49x480x832_score10/1.0.0 --pipeline ckpt/vap-wan14b \
        --out data                                   # Wan features: normalised moments, conditions, CLIP, UMT5
    python train.py --config configs/wan_vap_train.py --config.init_checkpoint=ckpt/wan_init \
        --config.data.dir=data/vap_latents/49x480x832_score10/1.0.0 --config.workdir=runs/wan_vap
"""
import ml_collections

from configs import cog_vap_train


def get_config():
    c = cog_vap_train.get_config()
    c.family = "wan"
    c.workdir = "runs/wan_vap"
    del c.scaling_factor, c.scheduler        # CogVideoX's (Wan latents are normalised per channel; flow matching)
    c.model_options = ml_collections.ConfigDict(dict(dtype="bfloat16", param_dtype="bfloat16", attention="",
                                                     remat="full"))
    c.steps = 60_000
    c.batch_size = 8                # global: 1 per GPU x 8
    c.caption_dropout = 0.02
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 2000
    # Dataset "49x480x832_score10" (49 frames at 480x832, alignment score > 10). `latent_size`, `text_len`
    # and `image_len` shape the synthetic data (kind "synthetic") and the on-the-fly encoders' captions.
    c.data.update(dict(num_refs=1, latent_size=(13, 60, 104), text_len=512, image_len=257))
    return c
