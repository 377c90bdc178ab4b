"""Building blocks both video VAEs share: the diagonal-Gaussian posterior, running the network tile by
tile, and the cross-fade that joins neighbouring tiles."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Posterior(NamedTuple):
    """Diagonal Gaussian over latents; `logvar` is clipped to [-30, 20] as in diffusers."""
    mean: Array
    logvar: Array

    @classmethod
    def from_concat(cls, dist: Array) -> "Posterior":
        """From the encoder's (or a precomputed dataset's) [..., 2C] = mean ‖ logvar on channels."""
        mean, logvar = jnp.split(dist, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    def mode(self) -> Array:
        return self.mean

    def sample(self, rng: Array) -> Array:
        noise = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + jnp.exp(0.5 * self.logvar) * noise


def each_tile(run: Callable[[Array], Array], tiles: list[Array]) -> list[Array]:
    """`run` on every tile. Tiles of one shape (most of a grid) go through one `lax.map`: the program
    holds one copy of the network per distinct tile shape, and activations of one tile at a time."""
    outs: list[Array | None] = [None] * len(tiles)
    for shape in dict.fromkeys(t.shape for t in tiles):
        same = [k for k, t in enumerate(tiles) if t.shape == shape]
        results = jax.lax.map(run, jnp.stack([tiles[k] for k in same]))
        for k, result in zip(same, results):
            outs[k] = result
    return outs


def cross_fade(prev: Array, tile: Array, extent: int, axis: int) -> Array:
    """Cross-fade the first `extent` rows (or columns) of `tile` from the last ones of its neighbour `prev`."""
    extent = min(prev.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    ramp = np.arange(extent) / extent  # float64 like the reference's Python-float weights, then cast
    shape = (extent,) + (1,) * (tile.ndim - axis - 1)
    w_tile = jnp.asarray(ramp.reshape(shape), tile.dtype)
    w_prev = jnp.asarray((1 - ramp).reshape(shape), tile.dtype)
    head = jax.lax.slice_in_dim(prev, prev.shape[axis] - extent, prev.shape[axis], axis=axis) * w_prev
    head = head + jax.lax.slice_in_dim(tile, 0, extent, axis=axis) * w_tile
    return jnp.concatenate([head, jax.lax.slice_in_dim(tile, extent, tile.shape[axis], axis=axis)], axis=axis)
