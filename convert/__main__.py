"""python -m convert SRC DST — PyTorch (diffusers/transformers) safetensors -> vapjax checkpoint.

SRC is a diffusers/transformers model folder (config.json + safetensors, single or sharded): a
CogVideoX(-VAP) transformer, a CogVideoX VAE or a T5 encoder, read from its config; or a whole
pipeline folder (model_index.json), which converts every component.

  python -m convert ByteDance/Video-As-Prompt-CogVideoX-5B/transformer out/transformer
  python -m convert THUDM/CogVideoX-5b-I2V/transformer out/transformer --init-expert copy --expert-layers 0-40
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import sys
import time
from typing import Callable

from convert import pipeline
from convert.cogvideox import convert_transformer, parse_layers
from convert.clip import convert_clip
from convert.cogvideox_vae import convert_vae
from convert.errors import ConversionError
from convert.output import write_folder
from convert.source import read_config, read_json
from convert.t5 import convert_t5
from convert.wan import convert_transformer as convert_wan_transformer
from convert.wan_vae import convert_vae as convert_wan_vae

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "fp32": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Converter:
    convert: Callable[..., object]   # convert(src, dst, *, dtype, [init_expert, expert_layers])
    expert_options: bool = False     # takes --init-expert / --expert-layers


# Model folders by class name (config.json `_class_name`, or transformers' `architectures[0]`; fnmatch
# patterns). A new model family is one entry, e.g. "WanTransformer3D*": Converter(convert_wan, True).
MODELS: dict[str, Converter] = {
    "CogVideoXTransformer3D*": Converter(convert_transformer, expert_options=True),
    "WanTransformer3D*": Converter(convert_wan_transformer, expert_options=True),
    "AutoencoderKLCogVideoX": Converter(convert_vae),
    "AutoencoderKLWan": Converter(convert_wan_vae),
    "CLIPVisionModel": Converter(convert_clip),
    "CLIPVisionModelWithProjection": Converter(convert_clip),
    "T5EncoderModel": Converter(convert_t5),
    "UMT5EncoderModel": Converter(convert_t5),
}
# Pipeline folders by model_index.json `_class_name`.
PIPELINES: dict[str, Converter] = {name: Converter(pipeline.convert_pipeline, expert_options=True)
                                   for name in pipeline.PIPELINES}


def _class_name(src: str) -> str:
    d = read_config(src)
    return d.get("_class_name") or (d.get("architectures") or ["?"])[0]


def _lookup(table: dict[str, Converter], name: str, src: str) -> Converter:
    for pattern, converter in table.items():
        if fnmatch.fnmatchcase(name, pattern):
            return converter
    raise ConversionError(f"{src}: don't know how to convert a {name!r} (known: {', '.join(table)})")


def convert_folder(src: str, dst: str, *, init_expert=None, expert_layers=None, dtype=None) -> str:
    """Convert one model or pipeline folder; returns what it was. `dst` is written whole or not at all
    (convert.output): a failure leaves it as it was, and files there that no conversion wrote stay."""
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: no such folder")
    index = os.path.join(src, "model_index.json")
    if os.path.exists(index):
        name = read_json(index).get("_class_name") or "?"
        converter = _lookup(PIPELINES, name, src)
    else:
        name = _class_name(src)
        converter = _lookup(MODELS, name, src)
    expert = {}
    if converter.expert_options:
        expert = dict(init_expert=init_expert, expert_layers=expert_layers)
    elif init_expert or expert_layers:
        raise ConversionError(f"{src}: --init-expert/--expert-layers apply to a transformer, not a {name!r}")
    write_folder(dst, lambda folder: converter.convert(src, folder, dtype=dtype, **expert))
    return name


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
