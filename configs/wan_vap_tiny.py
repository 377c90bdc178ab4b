"""A tiny random-weight Wan-VAP with the bundled demo inputs: runs on a laptop CPU in well under a
minute, no download. The output is noise-like (random weights); it exercises the whole pipeline.

    python sample.py --config configs/wan_vap_tiny.py
"""
import importlib.resources

import ml_collections

from configs import wan_vap


def get_config():
    c = wan_vap.get_config()
    assets = importlib.resources.files("vapjax") / "assets"
    c.image = str(assets / "demo_image.png")
    c.ref_video = str(assets / "demo_ref.mp4")
    c.prompt = "A brown ball on a grassy hill slowly inflates like a balloon and floats up out of the frame."
    c.ref_prompt = "A white ball against a plain white background swells and rises straight up. The camera is static."
    c.output = "out/wan_tiny.mp4"
    c.height, c.width, c.num_frames = 64, 96, 9
    c.steps = 6
    c.seed = 0
    c.dtype = "float32"
    c.attention = ""                  # XLA's attention (runs anywhere)
    c.random_init = True
    c.model = ml_collections.ConfigDict(dict(
        seed=0,
        tokenizer=str(assets / "tiny_tokenizer"),
        # The golden wan_pipeline_tiny's sizes: 3 layers, experts on 0 and 2.
        transformer=dict(num_heads=2, head_dim=12, in_channels=36, out_channels=16, text_dim=16, image_dim=20,
                         freq_dim=16, ffn_dim=40, num_layers=3, expert_layers=(0, 2)),
        vae=dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_downsample=(False, True, True)),
        text_encoder=dict(vocab_size=128, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2,
                          per_layer_position_bias=True),   # UMT5: a relative-bias table per layer
        image_encoder=dict(hidden_size=20, intermediate_size=40, num_layers=3, num_heads=2, patch_size=8,
                           image_size=32),
        image_processor=dict(shortest_edge=32, crop_height=32, crop_width=32),
        # Wan2.1-I2V-14B-480P's scheduler (spec §5.2).
        scheduler=dict(_class_name="UniPCMultistepScheduler", prediction_type="flow_prediction",
                       use_flow_sigmas=True, flow_shift=3.0, solver_order=2, solver_type="bh2",
                       lower_order_final=True, final_sigmas_type="zero", num_train_timesteps=1000),
    ))
    return c
