"""A tiny random-weight Wan-VAP trained on a synthetic paired latent dataset: CPU, ~20 s.

    python train.py --config configs/wan_vap_train_tiny.py --config.workdir=/tmp/wan_vap_tiny
"""
import ml_collections

from configs import wan_vap_train


def get_config():
    c = wan_vap_train.get_config()
    c.workdir = "runs/wan_vap_tiny"
    c.random_init = True
    # The widths of the official tiny golden model: 2 heads of 12, [noisy 4 | mask 4 | condition 4] channels;
    # 2 layers, both with an expert (the "all" layout, scanned like every preset; more layers mostly cost
    # compile time). Two expert layers, so that the reference's caption and CLIP embedders train: with one,
    # the reference's cross-attention comes after the only joint attention and has no path to the loss.
    c.model = ml_collections.ConfigDict(dict(
        num_heads=2, head_dim=12, in_channels=12, out_channels=4, text_dim=16, image_dim=20, freq_dim=8,
        ffn_dim=40, num_layers=2, expert_layers=(0, 1)))
    c.model_options = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", attention="",
                                                     remat="none"))
    c.steps = 100
    c.batch_size = 4
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 10
    c.optimizer.fp32_moments = False
    c.data.update(dict(kind="synthetic", seed=0, worker_count=0, size=8, latent_size=(3, 4, 6), text_len=8,
                       image_len=5))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.log_every = 50
    c.checkpoint_every = 100
    c.keep = 2
    return c
