"""vapjax: Video-As-Prompt in pure JAX/Flax."""
__version__ = "0.1.0"
