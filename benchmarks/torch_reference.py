"""The official PyTorch implementation on the same machine, for comparison with benchmarks.step_time:
one sampling forward (CFG batch) or one training step (expert only, gradient checkpointing, AdamW),
step time and peak memory, printed as the same JSON fields.

The official model class lives in the diffusers fork inside bytedance/Video-As-Prompt (not on PyPI);
point --repo at a checkout of that repository. Nothing of it is copied here: its `diffusers/src` is put
first on sys.path for this process only.

    python -m benchmarks.torch_reference --repo Video-As-Prompt --what forward --batch 2
    python -m benchmarks.torch_reference --repo Video-As-Prompt --what train --batch 1
    python -m benchmarks.torch_reference --repo Video-As-Prompt --tiny          # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

COG_5B_I2V_VAP = dict(num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16,
                      time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60,
                      sample_frames=49, patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True,
                      use_learned_positional_embeddings=True, block_idx_with_mot_ref=list(range(41)))
TINY = dict(COG_5B_I2V_VAP, num_attention_heads=2, attention_head_dim=16, time_embed_dim=16, text_embed_dim=16,
            num_layers=3, sample_width=6, sample_height=4, max_text_seq_length=8, block_idx_with_mot_ref=[0, 1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, help="a checkout of bytedance/Video-As-Prompt")
    ap.add_argument("--what", choices=["forward", "train"], default="forward")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.abspath(args.repo), "diffusers", "src"))
    import torch  # noqa: PLC0415
    from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: PLC0415 (the fork's)
    from diffusers.models.transformers.cogvideox_transformer_3d_mot import CogVideoXTransformer3DMOTModel  # noqa: PLC0415
    from vapjax.models.cogvideox import crop_region  # noqa: PLC0415 (the fork's pipeline module needs old transformers)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = TINY if args.tiny else COG_5B_I2V_VAP
    torch.set_default_dtype(dtype)             # build the 11 B parameters directly in bf16, on the device
    with torch.device(device):
        model = CogVideoXTransformer3DMOTModel(**cfg)
    torch.set_default_dtype(torch.float32)
    b, f = args.batch, 13
    h, w = (cfg["sample_height"], cfg["sample_width"])
    gh, gw = h // 2, w // 2
    g = torch.Generator(device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)
    x = rand(b, f, cfg["in_channels"], h, w)
    text = rand(b, cfg["max_text_seq_length"], cfg["text_embed_dim"])
    ref = rand(b, args.refs * f, cfg["in_channels"], h, w)
    ref_text = rand(b, args.refs * cfg["max_text_seq_length"], cfg["text_embed_dim"])
    t = torch.full((b,), 500, device=device)
    crops = crop_region(gh, gw, gh, gw)
    rope = get_3d_rotary_pos_embed(cfg["attention_head_dim"], crops, (gh, gw), f, device=device)
    rope_ref = get_3d_rotary_pos_embed(cfg["attention_head_dim"], crops, (gh, gw), f, device=device, mot_num=args.refs)
    call = lambda: model(x, text, t, image_rotary_emb=rope, return_dict=False, num_mot_ref=args.refs,
                         hidden_states_mot_ref=ref, encoder_hidden_states_mot_ref=ref_text,
                         image_rotary_emb_mot_ref=rope_ref)[0]

    if args.what == "forward":
        model.eval()

        def step():
            with torch.no_grad():
                return call()
    else:  # as the official trainer: only `_mot_ref` weights train, per-block checkpointing, AdamW
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_("_mot_ref" in name)
        # finetrainers wraps every block in activation checkpointing (full recompute); diffusers' own
        # enable_gradient_checkpointing does not pass the MoT keyword arguments through.
        from torch.utils.checkpoint import checkpoint  # noqa: PLC0415
        for block in model.transformer_blocks:
            block.forward = (lambda fwd: lambda *a, **k: checkpoint(fwd, *a, use_reentrant=False, **k))(block.forward)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.99),
                                eps=1e-8, weight_decay=1e-4)

        def step():
            loss = call().float().square().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    print(json.dumps({"impl": "pytorch-official", "what": args.what, "device": torch.cuda.get_device_name()
                      if device == "cuda" else "cpu", "batch": b, "refs": args.refs, "tiny": args.tiny,
                      "median_s": float(np.median(times)), "times_s": times, "peak_memory_gib": peak}))


if __name__ == "__main__":
    main()
