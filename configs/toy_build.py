"""Trains the VAP-Toy default (vapjax/assets/toy) from scratch: tokenizer, oracle, tiny CogVideoX VAE,
tiny CogVideoX-I2V backbone + T5, then the VAP expert with the backbone frozen.

    python -m vapjax.toy.build --config configs/toy_build.py --config.workdir=runs/toy
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "runs/toy"
    c.out = "vapjax/assets/toy"          # where `export` writes the pipeline folder and the oracle
    c.stages = "all"                     # or a comma-separated subset (re-runs them)
    c.seed = 0
    c.demo_condition = "outline"         # the bundled demo's reference (see configs/toy_vap.py)
    c.pool_per_condition = 64            # training clips per seen condition
    c.oracle = ml_collections.ConfigDict(dict(steps=1400, batch=32, train_clips=3300, test_clips=660,
                                                roundtrip_clips=440))
    c.vae = ml_collections.ConfigDict(dict(
        model=dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4, latent_channels=8),
        batch=8, crop=(32, 32), kl_weight=1e-6, variance_weight=1e-2,
        # The shipped VAE: plain reconstruction first, then a chroma-weighted phase (the first alone gave grey).
        phases=[dict(steps=400, lr=2e-3, chroma_weight=0.0, grad_clip=1.0),
                dict(steps=220, lr=1e-3, chroma_weight=4.0, grad_clip=10.0)]))
    c.text_length = 32
    c.text_encoder = ml_collections.ConfigDict(dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                                                    feed_forward_proj="gated-gelu"))
    c.transformer = ml_collections.ConfigDict(dict(
        num_heads=3, head_dim=32, time_embed_dim=64, num_layers=4, max_text_seq_length=32))
    # phases: each a fresh optimizer and batch stream (warm-up, then constant lr); init: a backbone folder
    # to continue from (its transformer/ and text_encoder/), or "" (random init). A run with init = the
    # result of the first phase and only the second phase gives the same backbone.
    c.backbone = ml_collections.ConfigDict(dict(batch=16, warmup=100, init="",
                                                phases=(dict(steps=1500, lr=1e-3), dict(steps=5000, lr=5e-4))))
    # ref_caption: "stripped" (the reference caption loses its effect words too, so only the reference
    # video carries the semantics: the shipped default) or "full" (it names its effect, as VAP-Data's do;
    # an expert trained so learns to read the caption rather than the video, README).
    c.expert = ml_collections.ConfigDict(dict(steps=3000, batch=16, lr=5e-4, warmup=100, caption_dropout=0.1,
                                              ref_caption="stripped"))
    return c
