"""A tiny random-weight CogVideoX-VAP trained on a synthetic paired latent dataset: CPU, ~a minute.

    python train.py --config configs/cog_vap_train_tiny.py --config.workdir=/tmp/vap_tiny
"""
import ml_collections

from configs import cog_vap_train


def get_config():
    c = cog_vap_train.get_config()
    c.family = "cogvideox"
    c.workdir = "runs/cog_vap_tiny"
    c.random_init = True
    c.model = ml_collections.ConfigDict(dict(
        num_heads=2, head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16, text_embed_dim=16,
        num_layers=3, sample_height=4, sample_width=6, sample_frames=5, max_text_seq_length=8,
        expert_layers=(0, 1)))
    c.model_options = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32", attention="",
                                                     remat="none"))
    c.steps = 300
    c.batch_size = 4
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 10
    c.optimizer.fp32_moments = False
    c.data.update(dict(kind="synthetic", seed=0, worker_count=0, size=8))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.log_every = 50
    c.checkpoint_every = 100
    c.keep = 2
    return c
