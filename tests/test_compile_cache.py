"""vapjax.compile_cache: where the cache goes, the opt-out, and that a second process really loads a
compiled executable from it instead of compiling (checked through JAX's cache-hit log line)."""
import os
import subprocess
import sys

import jax
import pytest

from vapjax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "vapjax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_dir() == os.path.expanduser("~/.cache/vapjax/jax")


def test_jax_variable_wins(monkeypatch, tmp_path):
    """JAX's own JAX_COMPILATION_CACHE_DIR beats the XDG default: the suite shares one folder this way."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.default_dir() == str(tmp_path / "jax")


def test_opt_out_leaves_jax_untouched(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.OPT_OUT, "1")
    before = jax.config.jax_compilation_cache_dir
    assert compile_cache.enable(str(tmp_path / "c")) is None
    assert jax.config.jax_compilation_cache_dir == before and not (tmp_path / "c").exists()


def test_unwritable_folder_warns_and_continues(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.OPT_OUT, raising=False)
    (tmp_path / "file").write_text("")
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(UserWarning, match="compilation cache off"):
        assert compile_cache.enable(str(tmp_path / "file" / "sub")) is None
    assert jax.config.jax_compilation_cache_dir == before


_CHILD = """
import logging, sys, time
import jax, jax.numpy as jnp
from vapjax import compile_cache
compile_cache.MIN_COMPILE_SECS = 0.0     # the test function compiles fast
print(compile_cache.enable(sys.argv[1]))
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)
logging.getLogger("jax").setLevel(logging.DEBUG)
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 17.0)
print(float(f(jnp.ones((8, 8))).sum()))
"""


def test_second_process_hits_the_cache(tmp_path):
    """Fresh processes, as sample.py runs: the first writes the executable, the second reads it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop(compile_cache.OPT_OUT, None)
    run = lambda: subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "cache")], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=300, check=True).stdout
    first = run()
    assert first.splitlines()[0] == str(tmp_path / "cache") and any((tmp_path / "cache").iterdir())
    second = run()
    assert "Persistent compilation cache hit" in second and "Persistent compilation cache hit" not in first
