"""Sample with the official VAP Wan2.1-I2V-14B checkpoint (after `python -m convert`).

    python sample.py --config configs/wan_vap.py --config.checkpoint=ckpt/vap-wan14b \
        --config.image=woman.jpg --config.ref_video=man.mp4 \
        --config.prompt="A young woman ... transforms into a Labubu toy ..." \
        --config.ref_prompt="A man ... transforms into a Labubu toy character ..." --config.output=out.mp4

Defaults follow the official inference script (infer/wan_vap.py) and the pipeline's own defaults where the
script passes nothing: 480x832, 49 frames ('evenly' over the reference), 50 steps of the checkpoint's
scheduler (its scheduler_config.json sets the solver and the flow shift), CFG 5, the pipeline's negative
prompts, transformer and UMT5 in bf16 (VAE and CLIP stay float32, as the script loads them), 16 fps.
Exactly one reference video. A setting that cannot take effect is an error naming it.
"""
import ml_collections

from vapjax.prompts import DEFAULT_NEGATIVE_PROMPT


def get_config():
    c = ml_collections.ConfigDict()
    c.family = "wan"                  # vapjax.families entry; "" takes the checkpoint's
    c.checkpoint = ""                 # a converted pipeline folder (python -m convert SRC DST)
    c.image = ""                      # the image to animate
    c.ref_video = ""                  # the reference video (one)
    c.prompt = ""                     # caption of the video to generate
    c.ref_prompt = ""                 # caption of the reference video
    c.negative_prompt = DEFAULT_NEGATIVE_PROMPT
    c.negative_ref_prompt = DEFAULT_NEGATIVE_PROMPT
    c.output = "out.mp4"
    c.fps = 16
    c.height = 480
    c.width = 832
    c.num_frames = 49
    c.steps = 50
    c.guidance_scale = 5.0
    c.max_sequence_length = 512       # fixed by Wan's cross-attention
    c.frames_selection = "evenly"     # "evenly" (repeats frames of a short reference), "first" or "random"
    c.seed = 42                       # infer/wan_vap.py's global seed (our noise is JAX's, not torch's)
    c.dtype = "bfloat16"              # transformer and UMT5 weights and compute; "" keeps the stored dtype
    c.attention = ""                  # "" (auto, vapjax.attention.choose): cuDNN flash in bf16 on a CUDA GPU,
                                      # blockwise elsewhere (fp32, CPU) — XLA's would materialise 40 heads x
                                      # 40560^2 joint logits (263 GB); "xla", "cudnn", "blockwise" force one
    c.vae_tiling = False              # spatial VAE tiles (the official script does not tile)
    c.random_init = False             # True: random weights from `c.model` instead of a checkpoint
    c.offload = "encoders"            # "encoders": text/image encoders and VAE on the host between uses;
                                      # "layers": also the transformer's layers, streamed in one at a time; "none"
    c.mesh = ""                       # "" one device; e.g. "data=2,tensor=4": the denoising loop over a device mesh
    c.split = "heads"                 # what `tensor` splits: "heads" or "sequence" (tokens; for heads it does not divide)
    c.quantize = ""                   # "int8": the frozen backbone's layer kernels stored as int8, dequantised per layer
    c.dry_run = False                 # True: compile every stage on abstract weights, print device memory, exit
    c.lora = ""                       # LoRA file(s) merged into the transformer: "a.safetensors:0.8|b.safetensors"
    return c
