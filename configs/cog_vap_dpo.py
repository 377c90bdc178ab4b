"""Diffusion-DPO of CogVideoX-VAP, the official train_single_node_dpo.sh recipe (spec §7.8): the policy is
the MoT model + LoRA (rank 32, α 32, PEFT's default init) on the attention projections of both streams —
our `blocks/attn/{to_q,to_k,to_v,to_out}` of backbone and expert are the official pattern
`(transformer_blocks|single_transformer_blocks).*(to_q|to_k|to_v|to_out.0)`, which matches `attn1.*` and
`attn1_mot_ref.*` — everything else frozen; the reference model is the same weights with the LoRA off.
Loss −log σ(−β/2·[(ℓ_w − ℓ_l) − (ℓ^ref_w − ℓ^ref_l)])·w_pair, β 500; one t per pair, independent noise.
AdamW β (0.9, 0.99), ε 1e-8, weight decay 1e-4, clip 1.0, lr 5e-5 constant, 60k steps, one pair per GPU
× 8 GPUs, caption dropout 0.02. The trained LoRA is written to <workdir>/lora.safetensors (diffusers).

    python -m vapjax.data.vap_data --manual_dir VAP-Data --data_dir DATA --config 49x480x720_all  # score > 0
    python -m vapjax.data.precompute --data_dir DATA/vap_data/49x480x720_all/1.0.0 --pipeline ckpt/vap-cog5b \
        --out LATENTS
    python train.py --config configs/cog_vap_dpo.py --config.init_checkpoint=ckpt/vap-cog5b/transformer \
        --config.data.dir=LATENTS/vap_latents/49x480x720_all/1.0.0 \
        --config.data.scores_csv=VAP-Data/vap_data.csv --config.workdir=runs/vap_dpo
    python train.py --config configs/cog_vap_dpo.py --config.random_init=True ...  (see cog_vap_dpo_tiny.py)

Data: `batch_size` counts pairs, drawn by `vapjax.data.dpo_pairs` as the official sampler (win ≥ 90 /
lose ≤ 10 for two epochs, then 80 / 30; reference of score 100, else in (80, 100); pair weight from the
score-bin frequencies) from a latents dataset of every scored clip of every split (config 49x480x720_all:
score > 0, the official DPO filter; its train-split clips are the rows) and the CSV's scores and kinds.
"""
from configs import cog_vap_train


def get_config():
    c = cog_vap_train.get_config()
    c.workdir = "runs/cog_vap_dpo"
    c.recipe = "dpo"
    c.lora.update(dict(rank=32, alpha=32.0, targets=r"blocks/attn/(to_q|to_k|to_v|to_out)/kernel"))
    c.dpo.beta = 500.0
    c.data.scores_csv = ""          # VAP-Data's vap_data.csv: the alignment scores the pairs are drawn by
    c.optimizer.update(dict(learning_rate=5e-5, warmup_steps=0))
    c.checkpoint_every = 500
    return c
