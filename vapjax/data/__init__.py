"""Training data: the `vap_data` TFDS builder (raw clips), the latent precompute, and grain loaders.

Submodules are imported on use (`vapjax.data.vap_data`, `.loader`, `.precompute`, `.synthetic`), so
importing this package pulls in neither TFDS nor grain.
"""
