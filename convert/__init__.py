"""Converters from PyTorch (diffusers/transformers) safetensors into vapjax checkpoints.

`FORMAT_VERSION` names what the converters write. Bump it whenever a converted folder would differ (a fix in
a key rule or a dtype rule, a new recorded field, a new `vapjax.checkpoint.FORMAT`): copies converted by an
older version (sample.py's cache of Hub checkpoints) are then converted again instead of reused.
"""
FORMAT_VERSION = 2
