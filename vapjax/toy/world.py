"""VAP-Toy: a synthetic video world in which every semantic condition is known exactly.

A *scene* is one or two textured sprites (shape, colour, texture) on a structured background. A
*condition* is a function of time that can be applied to any scene: it moves or deforms the sprites
(motion, concept), moves the camera, or restyles the frames (style), starting from the unmodified scene
at frame 0 (image-to-video: the first frame is the given image). A VAP training pair is one condition
applied to two different scenes, which share semantics but not pixels, as in VAP-Data; the ground-truth
output for a target image is the condition applied to the scene that image starts.

Backgrounds are never flat: over a flat backdrop a camera pan is the same video as every sprite moving
the other way, and a condition that cannot be told apart from another has no ground truth.

Everything is numpy and deterministic in a seed; clips are uint8 [F, H, W, 3].
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import numpy as np

HEIGHT, WIDTH, FRAMES = 64, 96, 9

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.92, 0.18, 0.15), "green": (0.20, 0.85, 0.25), "blue": (0.20, 0.40, 0.95),
           "magenta": (0.90, 0.20, 0.85), "cyan": (0.15, 0.85, 0.90), "orange": (0.98, 0.55, 0.10)}
TEXTURES = ("halves", "stripes")
BACKGROUNDS = ("gradient", "checker", "stripes", "noise")
BG_WORDS = {"gradient": "a shaded", "checker": "a checkered", "stripes": "a striped", "noise": "a mottled"}
TEXTURE_WORDS = {"halves": "two-tone", "stripes": "striped"}
GOLD = np.array((1.0, 0.80, 0.22), np.float32)
MORPH_INTO = {"circle": "square", "square": "triangle", "triangle": "cross", "cross": "circle"}


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sprite:
    shape: str
    colour: str
    texture: str
    x: float            # centre in world pixels, origin at the view's centre
    y: float
    size: float         # radius in pixels
    angle: float = 0.0  # radians


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    bg_colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    bg_seed: int
    sprites: tuple[Sprite, ...]

    @property
    def combo(self) -> tuple[str, str, str]:
        """(shape, colour, background) of the main sprite: what the held-out-scenes split holds out."""
        return self.sprites[0].shape, self.sprites[0].colour, self.background


def is_heldout_combo(shape: str, colour: str, background: str) -> bool:
    """About one (shape, colour, background) combination in five is never seen in training; every shape,
    colour and background on its own is."""
    return (SHAPES.index(shape) + 2 * list(COLOURS).index(colour) + 3 * BACKGROUNDS.index(background)) % 5 == 0


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """A random scene whose main-sprite combination belongs to `split` ("train" or "heldout"). A training
    scene's second sprite is never a held-out combination either; a held-out scene's second sprite is
    drawn freely (one draw, so the held-out split is the one the shipped default was measured on)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"scene split {split!r}: 'train' or 'heldout'")
    while True:
        shape, colour, bg = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(BACKGROUNDS)
        if is_heldout_combo(shape, colour, bg) == (split == "heldout"):
            break
    n = 1 + int(rng.random() < 0.35)
    xs = [rng.uniform(-12, 12)] if n == 1 else [rng.uniform(-26, -16), rng.uniform(16, 26)]
    sprites = []
    for i, x in enumerate(xs):
        s, c = shape, colour
        while i > 0:  # a training scene shows no held-out combination, not even as its second sprite
            s, c = rng.choice(SHAPES), rng.choice(list(COLOURS))
            if split == "heldout" or not is_heldout_combo(s, c, bg):
                break
        sprites.append(Sprite(str(s), str(c), str(rng.choice(TEXTURES)), float(x), float(rng.uniform(-7, 7)),
                              float(rng.uniform(10, 14) if n == 1 else rng.uniform(8, 11)),
                              float(rng.uniform(0, np.pi / 2))))
    dark = rng.uniform(0.08, 0.30, 3)
    light = np.clip(dark + rng.uniform(0.18, 0.35, 3), 0, 1)
    return Scene(str(bg), (tuple(map(float, dark)), tuple(map(float, light))), int(rng.integers(2 ** 31)),
                 tuple(sprites))


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class State:
    """Everything a condition can change at one instant."""
    cam: tuple[float, float] = (0.0, 0.0)   # camera centre in world pixels
    zoom: float = 1.0
    move: tuple[float, float] = (0.0, 0.0)  # sprite offset
    scale: float = 1.0
    angle: float = 0.0
    morph: float = 0.0                      # 0 = own shape, 1 = MORPH_INTO shape
    split: float = 0.0                      # 0 = one sprite, 1 = two halves apart
    dissolve: float = 0.0                   # fraction of the sprite gone
    gold: float = 0.0
    style: str = ""
    amount: float = 0.0                     # style strength


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    family: str                               # motion | camera | style | concept
    effect: str                               # the caption's effect sentence; "{subj}" is the sprites
    apply: Callable[[State, float, np.random.Generator], None]   # (state, t in [0, 1], rng) -> mutate state


def _set(**kw):
    def apply(s: State, t: float, rng: np.random.Generator) -> None:
        for k, f in kw.items():
            setattr(s, k, f(t, rng) if callable(f) else f)
    return apply


def _smooth(t: float) -> float:
    return t * t * (3 - 2 * t)


def _shake(t: float, rng: np.random.Generator) -> tuple[float, float]:
    return (0.0, 0.0) if t == 0 else (float(rng.choice([-1, 1]) * rng.uniform(3, 5)),
                                      float(rng.choice([-1, 1]) * rng.uniform(2, 4)))


_CONDITIONS = [
    Condition("move_left", "motion", "{subj} slides to the left.", _set(move=lambda t, r: (-34 * t, 0.0))),
    Condition("move_right", "motion", "{subj} slides to the right.", _set(move=lambda t, r: (34 * t, 0.0))),
    Condition("move_up", "motion", "{subj} rises upward.", _set(move=lambda t, r: (0.0, -22 * t))),
    Condition("move_down", "motion", "{subj} sinks downward.", _set(move=lambda t, r: (0.0, 22 * t))),
    Condition("spin", "motion", "{subj} spins around.", _set(angle=lambda t, r: 1.5 * np.pi * t)),
    Condition("bounce", "motion", "{subj} bounces up and down.",
              _set(move=lambda t, r: (0.0, -16 * abs(np.sin(2 * np.pi * t))))),
    Condition("inflate", "motion", "{subj} inflates like a balloon.", _set(scale=lambda t, r: 1 + 0.9 * t)),
    Condition("shrink", "motion", "{subj} shrinks away.", _set(scale=lambda t, r: 1 - 0.65 * t)),
    Condition("pan_left", "camera", "The camera pans to the left.", _set(cam=lambda t, r: (-30 * t, 0.0))),
    Condition("pan_right", "camera", "The camera pans to the right.", _set(cam=lambda t, r: (30 * t, 0.0))),
    Condition("zoom_in", "camera", "The camera zooms in.", _set(zoom=lambda t, r: 1 + 0.8 * t)),
    Condition("zoom_out", "camera", "The camera zooms out.", _set(zoom=lambda t, r: 1 / (1 + 0.8 * t))),
    Condition("shake", "camera", "The camera shakes.", _set(cam=_shake)),
    Condition("invert", "style", "The colours invert.", _set(style="invert", amount=lambda t, r: t)),
    Condition("posterize", "style", "The picture becomes posterized.", _set(style="posterize", amount=lambda t, r: t)),
    Condition("outline", "style", "The scene turns into a line drawing.", _set(style="outline", amount=lambda t, r: t)),
    Condition("pixelate", "style", "The picture pixelates.", _set(style="pixelate", amount=lambda t, r: t)),
    Condition("sepia", "style", "The scene fades to an old sepia photo.", _set(style="sepia", amount=lambda t, r: t)),
    Condition("morph", "concept", "{subj} morphs into another shape.", _set(morph=lambda t, r: _smooth(t))),
    Condition("split", "concept", "{subj} splits in two.", _set(split=lambda t, r: _smooth(t))),
    Condition("dissolve", "concept", "{subj} dissolves into dust.", _set(dissolve=lambda t, r: t)),
    Condition("gold", "concept", "{subj} turns to gold.", _set(gold=lambda t, r: t)),
]
CONDITIONS: dict[str, Condition] = {c.name: c for c in _CONDITIONS}
FAMILIES = ("motion", "camera", "style", "concept")
# Held out of every stage of training (backbone and expert), one per family: the zero-shot split.
UNSEEN = ("move_down", "shake", "pixelate", "split")
SEEN = tuple(n for n in CONDITIONS if n not in UNSEEN)


def condition_states(condition: str | None, frames: int, seed: int) -> list[State]:
    """The state at each frame; frame 0 is always the unmodified scene."""
    states = [State() for _ in range(frames)]
    if condition is None:
        return states
    if condition not in CONDITIONS:
        raise ValueError(f"unknown toy condition {condition!r}; known: {', '.join(CONDITIONS)}")
    rng = np.random.default_rng(seed)
    for k, s in enumerate(states):
        CONDITIONS[condition].apply(s, k / max(1, frames - 1), rng)
    return states


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _hash01(seed: int, *ints: np.ndarray) -> np.ndarray:
    """A deterministic pseudo-random value in [0, 1) per integer lattice point."""
    h = np.uint64(seed * 2654435761 % 2 ** 32)
    for i, a in enumerate(ints):
        h = h ^ (np.asarray(a).astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B1 + 0x85EBCA6B * i))
        h = (h ^ (h >> np.uint64(15))) * np.uint64(0x2C1B3C6D)
        h = h & np.uint64(0xFFFFFFFF)
    return ((h ^ (h >> np.uint64(13))) & np.uint64(0xFFFF)).astype(np.float32) / 65536.0


def _background(scene: Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[H, W, 3] colour of the infinite background at world coordinates (x, y)."""
    r = np.random.default_rng(scene.bg_seed)
    theta, phase = r.uniform(0, np.pi), r.uniform(0, 2 * np.pi)
    u = x * np.cos(theta) + y * np.sin(theta)
    if scene.background == "gradient":
        a = 0.5 + 0.5 * np.sin(2 * np.pi * u / r.uniform(90, 130) + phase)
    elif scene.background == "checker":
        s = r.uniform(9, 13)
        a = ((np.floor(x / s) + np.floor(y / s)) % 2).astype(np.float32)
    elif scene.background == "stripes":
        a = (np.sin(2 * np.pi * u / r.uniform(14, 20) + phase) > 0).astype(np.float32)
    else:  # noise: a few random plane waves, smooth and infinite
        a = np.zeros_like(x)
        for _ in range(4):
            th, f, ph = r.uniform(0, 2 * np.pi), r.uniform(1 / 30, 1 / 14), r.uniform(0, 2 * np.pi)
            a = a + np.sin(2 * np.pi * f * (x * np.cos(th) + y * np.sin(th)) + ph)
        a = np.clip(0.5 + a / 4, 0, 1)
    lo, hi = (np.asarray(c, np.float32) for c in scene.bg_colours)
    return lo + a[..., None] * (hi - lo)


def _sdf(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (in radii) to a unit shape; negative inside."""
    if shape == "circle":
        return np.hypot(px, py) - 1
    if shape == "square":
        return np.maximum(np.abs(px), np.abs(py)) - 0.85
    if shape == "triangle":  # equilateral, circumradius 1.15, pointing up
        k = np.sqrt(3.0)
        qy = -py
        return np.maximum(np.abs(px) * k / 2 + qy / 2, -qy) - 0.575
    if shape == "cross":
        ax, ay = np.abs(px), np.abs(py)
        return np.minimum(np.maximum(ax - 1.0, ay - 0.38), np.maximum(ax - 0.38, ay - 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _draw_sprite(img: np.ndarray, sp: Sprite, st: State, x: np.ndarray, y: np.ndarray, zoom: float,
                 dissolve_seed: int) -> None:
    """Composites one sprite (or its two split halves) onto img in place."""
    copies = [(0.0, 1.0)] if st.split == 0 else [(-1.5 * st.split, 1 - 0.3 * st.split), (1.5 * st.split, 1 - 0.3 * st.split)]
    colour = np.asarray(COLOURS[sp.colour], np.float32)
    colour = (1 - st.gold) * colour + st.gold * GOLD
    for offset, shrink in copies:
        size = sp.size * st.scale * shrink
        cx, cy = sp.x + st.move[0] + offset * sp.size, sp.y + st.move[1]
        a = sp.angle + st.angle
        dx, dy = (x - cx) / size, (y - cy) / size
        px, py = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        d = (1 - st.morph) * _sdf(sp.shape, px, py) + st.morph * _sdf(MORPH_INTO[sp.shape], px, py)
        cover = np.clip(0.5 - d * size * zoom, 0, 1)                     # anti-aliased edge, in view pixels
        if st.dissolve > 0:  # grains fixed to the sprite vanish in a random order
            grain = _hash01(dissolve_seed, np.floor(px * 2.5), np.floor(py * 2.5))
            cover = cover * (grain >= st.dissolve)
        dark = (px > 0) if sp.texture == "halves" else (np.sin(py * 3 * np.pi) > 0)
        shade = np.where(dark, 0.55, 1.0)[..., None]
        if st.gold > 0:  # a moving sheen
            shade = shade + st.gold * 0.35 * np.exp(-((px + py) * 2.0) ** 2)[..., None]
        img[:] = img * (1 - cover[..., None]) + np.clip(colour * shade, 0, 1) * cover[..., None]


def _stylise(img: np.ndarray, style: str, amount: float) -> np.ndarray:
    if not style or amount == 0:
        return img
    if style == "invert":
        out = 1 - img
    elif style == "posterize":
        out = np.round(img) * 0.8 + 0.1  # two levels per channel
    elif style == "outline":
        lum = img @ np.array([0.3, 0.59, 0.11], np.float32)
        gx = np.abs(np.diff(lum, axis=1, append=lum[:, -1:]))
        gy = np.abs(np.diff(lum, axis=0, append=lum[-1:]))
        out = np.repeat(np.clip((gx + gy) * 4, 0, 1)[..., None], 3, -1)
    elif style == "pixelate":
        b = 1 + int(round(amount * 7))
        h, w = img.shape[:2]
        out = img[(np.arange(h) // b) * b][:, (np.arange(w) // b) * b]
        return out
    elif style == "sepia":
        lum = img @ np.array([0.3, 0.59, 0.11], np.float32)
        out = np.clip(lum[..., None] * np.array([1.15, 0.9, 0.6], np.float32) + 0.08, 0, 1)
    else:
        raise ValueError(f"unknown style {style!r}")
    return (1 - amount) * img + amount * out


def render(scene: Scene, condition: str | None, *, frames: int = FRAMES, height: int = HEIGHT,
           width: int = WIDTH, seed: int = 0) -> np.ndarray:
    """The clip of `condition` (None: a still scene) applied to `scene`: uint8 [frames, height, width, 3].
    `seed` drives the condition's own randomness (the camera shake)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    # The world is defined at the default size; other sizes see the same world, resampled.
    cu = (u + 0.5 - width / 2) * (WIDTH / width)
    cv = (v + 0.5 - height / 2) * (HEIGHT / height)
    out = np.empty((frames, height, width, 3), np.uint8)
    for k, st in enumerate(condition_states(condition, frames, seed)):
        x, y = cu / st.zoom + st.cam[0], cv / st.zoom + st.cam[1]
        img = _background(scene, x, y).astype(np.float32)
        for i, sp in enumerate(scene.sprites):
            _draw_sprite(img, sp, st, x, y, st.zoom * width / WIDTH, scene.bg_seed + i)
        img = _stylise(img, st.style, st.amount)
        out[k] = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def _noun(sp: Sprite) -> str:
    return f"{TEXTURE_WORDS[sp.texture]} {sp.colour} {sp.shape}"


def describe(scene: Scene) -> str:
    """The scene alone: 'A striped red circle and a two-tone blue square on a checkered background.'"""
    things = " and ".join(("A " if i == 0 else "a ") + _noun(sp) for i, sp in enumerate(scene.sprites))
    return f"{things} on {BG_WORDS[scene.background]} background."


def caption(scene: Scene, condition: str | None, strip_effect: bool = False) -> str:
    """VAP-Data-style caption: the scene, then the condition's effect sentence (omitted when
    `strip_effect`, so that only a reference video can carry the semantics)."""
    text = describe(scene)
    if condition is None or strip_effect:
        return text
    subj = f"The {scene.sprites[0].shape}" if len(scene.sprites) == 1 else "Each shape"
    return f"{text} {CONDITIONS[condition].effect.format(subj=subj)}"


# ---------------------------------------------------------------------------------------------
# Pairs and splits
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pair:
    """One condition on two scenes: the reference clip shows it; the target's ground truth shows it on
    another scene, which starts from the target image (the target's first frame)."""
    condition: str
    reference: Scene
    target: Scene
    ref_seed: int
    target_seed: int

    def reference_clip(self, **kw) -> np.ndarray:
        return render(self.reference, self.condition, seed=self.ref_seed, **kw)

    def target_clip(self, **kw) -> np.ndarray:
        return render(self.target, self.condition, seed=self.target_seed, **kw)

    def captions(self, strip_effect: bool = False, strip_reference: bool = False) -> tuple[str, str]:
        """(reference caption, target caption): `strip_effect` drops the effect words from the target's,
        `strip_reference` from the reference's (then only the reference video can carry the semantics)."""
        return (caption(self.reference, self.condition, strip_reference),
                caption(self.target, self.condition, strip_effect))


SPLITS = {  # name -> (scene split, conditions)
    "train": ("train", SEEN),
    "heldout_scenes": ("heldout", SEEN),
    "unseen_conditions": ("heldout", UNSEEN),
}


def sample_pair(rng: np.random.Generator, split: str = "train", condition: str | None = None) -> Pair:
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}; known: {', '.join(SPLITS)}")
    scenes, conditions = SPLITS[split]
    cond = condition or str(rng.choice(conditions))
    return Pair(cond, sample_scene(rng, scenes), sample_scene(rng, scenes),
                int(rng.integers(2 ** 31)), int(rng.integers(2 ** 31)))


def pairs(split: str, n: int, seed: int, conditions: Sequence[str] | None = None) -> list[Pair]:
    """`n` pairs of a split, deterministic in `seed`; conditions cycle evenly when given (or the split's)."""
    rng = np.random.default_rng(zlib.crc32(f"{split}/{seed}".encode()))
    conds = list(conditions or SPLITS[split][1])
    return [sample_pair(rng, split, conds[i % len(conds)]) for i in range(n)]
