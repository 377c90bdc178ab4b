"""Converters from PyTorch (diffusers/transformers layout) safetensors into vapjax checkpoints."""
