"""python -m convert SRC DST — PyTorch (diffusers/transformers) safetensors -> vapjax checkpoint.

SRC is a diffusers/transformers model folder (config.json + safetensors, single or sharded): a
CogVideoX(-VAP) transformer, a CogVideoX VAE or a T5 encoder, read from its config; or a whole
pipeline folder (model_index.json), which converts every component.

  python -m convert ByteDance/Video-As-Prompt-CogVideoX-5B/transformer out/transformer
  python -m convert THUDM/CogVideoX-5b-I2V/transformer out/transformer --init-expert copy --expert-layers 0-40
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from convert.errors import ConversionError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "fp32": "float32", "bf16": "bfloat16"}


def _class_name(src: str) -> str:
    from convert.source import read_config  # noqa: PLC0415
    d = read_config(src)
    return d.get("_class_name") or (d.get("architectures") or ["?"])[0]


def convert_folder(src: str, dst: str, *, init_expert=None, expert_layers=None, dtype=None) -> str:
    """Convert one model folder; returns what it was."""
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: no such folder")
    if os.path.exists(os.path.join(src, "model_index.json")):
        from convert.pipeline import convert_pipeline  # noqa: PLC0415 (heavy, only when needed)
        convert_pipeline(src, dst, init_expert=init_expert, expert_layers=expert_layers, dtype=dtype)
        return "pipeline"
    name = _class_name(src)
    if name.startswith("CogVideoXTransformer3D"):
        from convert.cogvideox import convert_transformer  # noqa: PLC0415
        convert_transformer(src, dst, init_expert=init_expert, expert_layers=expert_layers, dtype=dtype)
        return name
    if name.startswith("WanTransformer3D"):
        from convert.wan import convert_transformer  # noqa: PLC0415
        convert_transformer(src, dst, init_expert=init_expert, expert_layers=expert_layers, dtype=dtype)
        return name
    if init_expert or expert_layers:
        raise ConversionError(f"{src}: --init-expert/--expert-layers apply to a transformer, not a {name!r}")
    if name == "AutoencoderKLCogVideoX":
        from convert.cogvideox_vae import convert_vae  # noqa: PLC0415
        convert_vae(src, dst, dtype=dtype)
        return name
    if name in ("T5EncoderModel", "UMT5EncoderModel"):
        from convert.t5 import convert_t5  # noqa: PLC0415
        convert_t5(src, dst, dtype=dtype)
        return name
    raise ConversionError(f"{src}: don't know how to convert a {name!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="diffusers folder (transformer/, or a pipeline folder with model_index.json)")
    ap.add_argument("dst", help="output folder (a vapjax checkpoint)")
    ap.add_argument("--init-expert", choices=["copy"], default=None,
                    help="stock checkpoint: create the VAP expert as a copy of the backbone layers")
    ap.add_argument("--expert-layers", default=None, help="layers with an expert, e.g. 0-40 (official)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="storage dtype (default: bf16 for a bf16 checkpoint, else fp32)")
    args = ap.parse_args(argv)
    from convert.cogvideox import parse_layers  # noqa: PLC0415
    t0 = time.time()
    try:
        layers = parse_layers(args.expert_layers) if args.expert_layers else None
        what = convert_folder(args.src, args.dst, init_expert=args.init_expert, expert_layers=layers,
                              dtype=DTYPES.get(args.dtype))
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {what} {args.src} -> {args.dst} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
