"""JAX's persistent compilation cache, on by default for sample.py and train.py: a second run of the
same shapes loads its executables from disk instead of compiling them again.

    from vapjax import compile_cache
    compile_cache.enable()          # first thing in main(), before anything is jitted

The folder is $JAX_COMPILATION_CACHE_DIR when that is set (JAX's own variable: the test suite points
every process of a run at one folder this way), else $XDG_CACHE_HOME/vapjax/jax (default
~/.cache/vapjax/jax); VAPJAX_NO_COMPILE_CACHE=1 turns it off. Compilations of ≥ 0.1 s are stored: on the tiny sample.py run that keeps 21 entries
(0.4 MB) and brings a second run from ~43 s to ~14 s wall; a 0.5 s bar missed the model set-up jits
(~25 s), no bar at all stored 81 entries for no further gain (benchmarks/NOTES.md).
"""
from __future__ import annotations

import os
import warnings

import jax

OPT_OUT = "VAPJAX_NO_COMPILE_CACHE"
MIN_COMPILE_SECS = 0.1


def default_dir() -> str:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vapjax", "jax")


def enable(path: str | None = None) -> str | None:
    """Turn the cache on at `path` (default: `default_dir()`). Returns the folder in use, or None when
    VAPJAX_NO_COMPILE_CACHE is set (to anything but "" or "0") or the folder cannot be created. JAX decides
    once, at the first compilation, whether a cache is used: call this before anything is jitted."""
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return None
    path = os.path.abspath(os.path.expanduser(path or default_dir()))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache off: cannot create {path} ({e.strerror}); set {OPT_OUT}=1 to silence")
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return path
