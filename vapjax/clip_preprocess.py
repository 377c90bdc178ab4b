"""CLIP image preprocessing, bit-identical to transformers' `CLIPImageProcessor` (the PIL path).

What the processor does to an RGB uint8 image (transformers 4.x `CLIPImageProcessor`, 5.x
`CLIPImageProcessorPil`, the same arithmetic), and what `preprocess` reproduces:

1. resize with PIL (`Image.resize`, the config's `resample`, 3 = bicubic) on the uint8 image. With
   `size={"shortest_edge": s}` the short side becomes s and the long side int(s * long / short)
   (truncated); with `{"height", "width"}` the image is resized to exactly that;
2. center crop to `crop_size`: top = (h - ch) // 2, left = (w - cw) // 2; an image smaller than
   the crop is first zero-padded (ceil of half the deficit on the top/left);
3. rescale: float64(u8) * rescale_factor, rounded to float32;
4. normalise in float32: (x - float32(mean)) / float32(std), per channel.

The result stays channels-last, [..., crop_h, crop_w, 3] float32, where the processor returns
[B, 3, H, W]. Inputs are RGB uint8 arrays, e.g. from `vapjax.video.read_image` (which drops an alpha
channel as transformers 4.x's `convert_rgb` does; 5.x instead composites it onto white).
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPPreprocessConfig:
    """Defaults: transformers' CLIPImageProcessor (224, bicubic, OpenAI mean/std), as Wan2.1-I2V ships it."""
    shortest_edge: int | None = 224          # resize the short side to this ...
    height: int | None = None                # ... or to exactly height x width
    width: int | None = None
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3                        # PIL.Image.Resampling code (3 = BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        if self.do_resize and (self.shortest_edge is None) == (self.height is None or self.width is None):
            raise ValueError("CLIP preprocessing: give either shortest_edge or height and width for the resize")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("CLIP preprocessing: image_mean and image_std need 3 values (RGB)")

    @classmethod
    def from_transformers(cls, d: dict) -> "CLIPPreprocessConfig":
        """From a `preprocessor_config.json` dict of a CLIPImageProcessor."""
        kind = d.get("image_processor_type", "CLIPImageProcessor")
        if not kind.startswith("CLIPImageProcessor"):
            raise ValueError(f"image_processor_type {kind!r}: not a CLIPImageProcessor")
        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, int):  # old configs: an int means the shortest edge
            size = {"shortest_edge": size}
        crop = d.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if set(size) not in ({"shortest_edge"}, {"height", "width"}):
            raise ValueError(f"size {size}: expected {{'shortest_edge': n}} or {{'height': h, 'width': w}}")
        return cls(shortest_edge=size.get("shortest_edge"), height=size.get("height"), width=size.get("width"),
                   crop_height=crop["height"], crop_width=crop["width"], resample=int(d.get("resample", 3)),
                   rescale_factor=d.get("rescale_factor", 1 / 255),
                   image_mean=d.get("image_mean", OPENAI_CLIP_MEAN), image_std=d.get("image_std", OPENAI_CLIP_STD),
                   do_resize=d.get("do_resize", True), do_center_crop=d.get("do_center_crop", True),
                   do_rescale=d.get("do_rescale", True), do_normalize=d.get("do_normalize", True))

    @classmethod
    def from_file(cls, path: str) -> "CLIPPreprocessConfig":
        """A `preprocessor_config.json` (e.g. a Wan pipeline's image_processor/)."""
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the image processor config ({type(e).__name__})") from None
        try:
            return cls.from_transformers(d)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def resize_size(height: int, width: int, cfg: CLIPPreprocessConfig) -> tuple[int, int]:
    """(height, width) after the resize step."""
    if cfg.shortest_edge is None:
        return cfg.height, cfg.width
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(cfg.shortest_edge * long / short)
    return (new_long, cfg.shortest_edge) if width <= height else (cfg.shortest_edge, new_long)


def _center_crop(image: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """[H, W, C] -> [ch, cw, C], zero-padding first where the image is smaller than the crop."""
    h, w = image.shape[:2]
    if h < ch or w < cw:
        nh, nw = max(h, ch), max(w, cw)
        top, left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded = np.zeros((nh, nw) + image.shape[2:], image.dtype)
        padded[top:top + h, left:left + w] = image
        image, h, w = padded, nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top:top + ch, left:left + cw]


def preprocess_one(image: np.ndarray, cfg: CLIPPreprocessConfig) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [crop_h, crop_w, 3] (or the resized size without a crop)."""
    from PIL import Image

    if cfg.do_resize:
        h, w = resize_size(*image.shape[:2], cfg)
        image = np.asarray(Image.fromarray(image).resize((w, h), resample=Image.Resampling(cfg.resample)))
    if cfg.do_center_crop:
        image = _center_crop(image, cfg.crop_height, cfg.crop_width)
    x = image.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else image
    x = np.asarray(x, np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return x


def preprocess(images, cfg: CLIPPreprocessConfig = CLIPPreprocessConfig()) -> np.ndarray:
    """RGB uint8 images [..., H, W, 3] (one image or a stack of equal size) -> float32
    [..., crop_h, crop_w, 3], the CLIP vision tower's input."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3 or 0 in images.shape[-3:-1]:
        raise ValueError(f"CLIP preprocessing: expected RGB uint8 images [..., H, W, 3], "
                         f"got {images.dtype} {images.shape}")
    flat = images.reshape((-1,) + images.shape[-3:])
    out = np.stack([preprocess_one(np.ascontiguousarray(im), cfg) for im in flat])
    return out.reshape(images.shape[:-3] + out.shape[1:])
