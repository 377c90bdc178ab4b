"""A tiny random-weight CogVideoX-VAP with the bundled demo inputs: runs on a laptop CPU in about a
minute, no download. The output is noise-like (random weights); it exercises the whole pipeline.

    python sample.py --config configs/cog_vap_tiny.py
"""
import importlib.resources

import ml_collections

from configs import cog_vap


def get_config():
    c = cog_vap.get_config()
    assets = importlib.resources.files("vapjax") / "assets"
    c.image = str(assets / "demo_image.png")
    c.ref_video = str(assets / "demo_ref.mp4")
    c.prompt = "A brown ball on a grassy hill slowly inflates like a balloon and floats up out of the frame."
    c.ref_prompt = "A white ball against a plain white background swells and rises straight up. The camera is static."
    c.output = "out/tiny.mp4"
    c.height, c.width, c.num_frames = 64, 96, 9
    c.steps = 8
    c.max_sequence_length = 32
    c.dtype = "float32"
    c.vae_tiling = False
    c.random_init = True
    c.model = ml_collections.ConfigDict(dict(
        seed=0,
        tokenizer=str(assets / "tiny_tokenizer"),
        transformer=dict(num_heads=2, head_dim=16, in_channels=32, out_channels=16, time_embed_dim=16,
                         text_embed_dim=32, num_layers=4, sample_height=8, sample_width=12, sample_frames=9,
                         max_text_seq_length=32, expert_layers=(0, 1, 2)),
        vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                 sample_height=64, sample_width=96),
        text_encoder=dict(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2),
        # CogVideoX-5B-I2V's scheduler (spec §5.1).
        scheduler=dict(_class_name="CogVideoXDDIMScheduler", beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type="v_prediction",
                       rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0,
                       timestep_spacing="trailing", clip_sample=False),
    ))
    return c
