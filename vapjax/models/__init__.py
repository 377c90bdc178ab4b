"""Model families, one file each (CogVideoX-VAP transformer, CogVideoX VAE, T5, ...)."""
