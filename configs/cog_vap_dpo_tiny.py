"""DPO on the tiny random CogVideoX-VAP with synthetic (win, lose, reference) triples: CPU, under a minute.

    python train.py --config configs/cog_vap_dpo_tiny.py --config.workdir=/tmp/vap_dpo_tiny
"""
from configs import cog_vap_dpo, cog_vap_train_tiny


def get_config():
    c = cog_vap_train_tiny.get_config()
    dpo = cog_vap_dpo.get_config()
    c.workdir = "runs/cog_vap_dpo_tiny"
    c.recipe, c.dpo = dpo.recipe, dpo.dpo
    c.lora.update(dict(rank=4, alpha=4.0, targets=dpo.lora.targets))
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=0))
    c.batch_size = 2     # pairs
    c.steps = 60
    c.log_every = 20
    return c
