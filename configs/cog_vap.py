"""Sample with the official VAP CogVideoX-5B checkpoint (after `python -m convert`).

    python sample.py --config configs/cog_vap.py --config.checkpoint=ckpt/vap-cog5b \
        --config.image=cat.png --config.ref_video=balloon.mp4 \
        --config.prompt="A cat ... inflates and floats away." --config.ref_prompt="A sneaker ... floats away." \
        --config.output=out.mp4

Several references (up to 3): --config.ref_video="a.mp4|b.mp4" --config.ref_prompt="caption a|caption b".
Defaults follow the official inference script (infer/cog_vap.py): 480x720, 49 frames, 50 DDIM steps,
CFG 6 with dynamic CFG, VAE posterior samples, bf16. A setting that cannot take effect (e.g. a checkpoint
together with random_init) is an error naming it.
"""
import ml_collections

from vapjax.prompts import DEFAULT_NEGATIVE_PROMPT


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "cogvideox"            # vapjax.families entry; "" takes the checkpoint's
    c.checkpoint = ""                 # a converted pipeline folder (python -m convert SRC DST)
    c.image = ""                      # the image to animate
    c.ref_video = ""                  # reference video(s), "|"-separated
    c.prompt = ""                     # caption of the video to generate
    c.ref_prompt = ""                 # caption of each reference video, "|"-separated
    c.negative_prompt = DEFAULT_NEGATIVE_PROMPT
    c.negative_ref_prompt = DEFAULT_NEGATIVE_PROMPT
    c.output = "out.mp4"
    c.fps = 16
    c.height = 480
    c.width = 720
    c.num_frames = 49
    c.steps = 50
    c.guidance_scale = 6.0
    c.dynamic_cfg = True
    c.max_sequence_length = 226
    c.frames_selection = "evenly"     # "evenly" (repeats frames of a short reference), "first" or "random"
    c.frames_per_reference_length = False  # True: "evenly" over each reference's own length (not official)
    c.posterior = "sample"            # VAE encodes: "sample" (official) or "mode"
    c.seed = 0
    c.dtype = "bfloat16"              # weights and compute; "" keeps the stored dtype
    c.attention = ""                  # vapjax.attention implementation: "" (auto), "xla", "cudnn", "blockwise"
    c.vae_tiling = True               # spatial tiles for the VAE (needed for 480x720 on one GPU)
    c.random_init = False             # True: random weights from `c.model` instead of a checkpoint
    c.offload = "encoders"            # "encoders": text/image encoders and VAE on the host between uses;
                                      # "layers": also the transformer's layers, streamed in one at a time; "none"
    c.mesh = ""                       # "" one device; e.g. "data=2,tensor=4": the denoising loop over a device mesh
    c.split = "heads"                 # what `tensor` splits: "heads" or "sequence" (tokens; for heads it does not divide)
    c.quantize = ""                   # "int8": the frozen backbone's layer kernels stored as int8, dequantised per layer
    c.dry_run = False                 # True: compile every stage on abstract weights, print device memory, exit
    c.lora = ""                       # LoRA file(s) merged into the transformer: "a.safetensors:0.8|b.safetensors"
    return c
