"""Prompts shared by the pipelines and their configs (a leaf module: configs import it, not the pipelines)."""

# The official CogVideoX-VAP pipeline's default for both negative prompts (CPIPE:680, 705).
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards")
