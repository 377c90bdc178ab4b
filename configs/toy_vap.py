"""VAP-Toy: the trained toy default. Animates a bundled toy image with the semantics of a bundled toy
reference video, on a CPU in seconds, with no download; writes [reference | generated] side by side and
prints the oracle's reading of both.

    python sample.py --config configs/toy_vap.py
    python sample.py --config configs/toy_vap.py --config.image=my.png --config.ref_video=my.mp4 \
        --config.prompt="A striped red circle on a checkered background." \
        --config.ref_prompt="A two-tone blue square on a striped background. The square spins around."

Own inputs must be toy-sized (64x96, 9 frames; see vapjax/toy/world.py for the world the model knows).
The model is a tiny CogVideoX-VAP trained from scratch by `python -m vapjax.toy.build` (configs/toy_build.py).
"""
import importlib.resources
import json

from configs import cog_vap


def get_config():
    c = cog_vap.get_config()
    toy = importlib.resources.files("vapjax") / "assets" / "toy"
    demo = json.loads((toy / "demo.json").read_text())
    c.checkpoint = str(toy / "pipeline")
    c.image = str(toy / "image.png")
    c.ref_video = str(toy / "reference.mp4")
    c.prompt = demo["prompt"]            # the target's caption, without effect words: the reference carries them
    c.ref_prompt = demo["ref_prompt"]
    c.negative_prompt = c.negative_ref_prompt = ""
    c.output = "out/toy.mp4"
    c.fps = 8
    c.height, c.width, c.num_frames = 64, 96, 9
    c.steps = 20
    c.guidance_scale = 1.0               # no CFG (the toy model is trained and evaluated without it)
    c.dynamic_cfg = False
    c.max_sequence_length = 32
    c.posterior = "mode"
    c.dtype = "float32"
    c.vae_tiling = False
    c.side_by_side = True                # [reference | generated]
    c.oracle = str(toy / "oracle.npz")   # print the toy oracle's reading of both
    return c
