import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def golden_dir() -> pathlib.Path:
    """Fixtures from the official implementation: $VAPJAX_GOLDEN_DIR, default ../shared/golden."""
    return pathlib.Path(os.environ.get("VAPJAX_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))


def golden_cases() -> list[pathlib.Path]:
    """The case folders; a missing or empty golden folder fails (at collection), naming it, instead of
    the golden tests silently collecting nothing."""
    d = golden_dir()
    cases = sorted(p for p in d.iterdir() if (p / "case.json").exists()) if d.is_dir() else []
    if not cases:
        pytest.fail(f"no golden cases: {d} is {'empty' if d.is_dir() else 'missing'} (set VAPJAX_GOLDEN_DIR)",
                    pytrace=False)
    return cases


# What a golden case records, by the one key its case.json names (README.md in the golden folder).
GOLDEN_KINDS = ("model", "pipeline", "training")


class GoldenCaseError(ValueError):
    """A golden case folder whose case.json cannot be read or classified (one line, naming the file)."""


def golden_meta(case: pathlib.Path) -> dict:
    path = pathlib.Path(case) / "case.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GoldenCaseError(f"{path}: unreadable case.json ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise GoldenCaseError(f"{path}: case.json must be a JSON object, got {type(meta).__name__}")
    return meta


def golden_kind(case: pathlib.Path) -> str:
    """'model', 'pipeline' or 'training': the one of GOLDEN_KINDS that case.json names. Each kind has
    its test file (model and pipeline: test_golden.py; training: test_golden_training.py)."""
    meta = golden_meta(case)
    kinds = [k for k in GOLDEN_KINDS if k in meta]
    if len(kinds) != 1:
        raise GoldenCaseError(f"{pathlib.Path(case) / 'case.json'}: must name exactly one of {', '.join(GOLDEN_KINDS)}; "
                              f"names {', '.join(kinds) or 'none'}")
    return kinds[0]


def rel_err(got, want) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# A bf16 forward is held to the official model's own bf16 output, not to a fixed tolerance: ours may be
# at most this factor further from the fp32 golden than the official bf16 run is (measured 0.98-1.16 on
# the shared cases, 1.19 on a held-out 3-reference one); a reference RoPE mistake is 1.6-3x beyond it.
BF16_VS_OFFICIAL = 1.25


def official_bf16_error(case: pathlib.Path) -> float:
    """The official model's bf16 output (expected_official_bf16.safetensors) against its fp32 golden."""
    from safetensors.numpy import load_file  # noqa: PLC0415
    path = pathlib.Path(case) / "expected_official_bf16.safetensors"
    assert path.exists(), f"{path}: missing (the official bf16 output bounds our bf16 error)"
    return rel_err(load_file(path)["sample"], load_file(pathlib.Path(case) / "expected.safetensors")["sample"])


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    except ImportError:
        pass


# One persistent XLA compilation cache for the whole run. Many tests (and the sample.py / train.py
# subprocesses, through vapjax.compile_cache) compile the same programs: the tiny models' steps, the
# pipelines' stages. With one folder shared by both xdist workers and every subprocess, each program is
# compiled once per run. The folder is new for every run (cold, as in CI) unless VAPJAX_TEST_XLA_CACHE
# names one to keep between runs. A cached executable is the one a fresh compile gives, so no result
# depends on it. The size limit turns on JAX's file lock, so two workers never read a half-written entry.
XLA_CACHE_ENV = "VAPJAX_TEST_XLA_CACHE"
_CACHE_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.05",
                   "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)}


# The suite compiles hundreds of small programs and runs most of them a few times, so LLVM's time on the
# machine code dominates: at -O1 instead of -O3 a tiny train.py run compiles in ~11 s instead of ~15 s,
# and the toy evaluation runs as fast (60 vs 64 s); the whole suite takes ~3 min less. XLA's HLO passes
# (fusion, layout, the numerics of every op) are the same at every level; only instruction selection may
# round differently (two *different* programs that computed bit-identical results at -O3 can differ by an
# ulp: test_cogvideox_ablations bounds those by 1e-6). Test processes and their subprocesses inherit the
# variable (tests that set XLA_FLAGS for a subprocess append to it with `with_xla_flags`).
XLA_TEST_FLAGS = "--xla_backend_optimization_level=1"


def with_xla_flags(*flags: str) -> str:
    """The run's XLA_FLAGS plus `flags`, for a subprocess's environment."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def pytest_configure(config):
    if XLA_TEST_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # read when the backend starts, after this
        os.environ["XLA_FLAGS"] = with_xla_flags(XLA_TEST_FLAGS)
    if not os.environ.get(XLA_CACHE_ENV):  # the controller (or a run without xdist): workers inherit it
        os.environ[XLA_CACHE_ENV] = tempfile.mkdtemp(prefix="vapjax-test-xla-")
        config._vapjax_owned_cache = os.environ[XLA_CACHE_ENV]
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[XLA_CACHE_ENV]
    os.environ.update(_CACHE_SETTINGS)
    import jax  # noqa: PLC0415 - after the variables, and set again in case a plugin imported jax first
    jax.config.update("jax_compilation_cache_dir", os.environ[XLA_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(_CACHE_SETTINGS["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_compilation_cache_max_size", int(_CACHE_SETTINGS["JAX_COMPILATION_CACHE_MAX_SIZE"]))


def pytest_unconfigure(config):
    owned = getattr(config, "_vapjax_owned_cache", None)
    if owned:
        shutil.rmtree(owned, ignore_errors=True)


# The long tests start first, so that neither xdist worker is left with a queue of them at the end
# (`--dist worksteal` in pyproject.toml then evens out the rest). Heaviest first, from
# `pytest --durations=40` on the 2-core machine; a test missing here only starts in file order.
LONG_FIRST = (
    "test_toy.py::test_shipped_default_transfers_semantics",
    "test_recipes.py::test_tiny_3ref_training_lowers_the_loss",
    "test_training.py::test_kill_and_resume",
    "test_inference.py::test_one_video_over_eight_devices_equals_one_device",
    "test_recipes.py::test_batched_references_equal_per_sample_runs",
    "test_benchmarks.py::test_gpu_session_rehearsal",
    "test_training.py::test_train_on_precomputed_vap_data",
    "test_toy.py::test_ablation_study_smoke",
    "test_inference.py::test_hub_id_is_downloaded_converted_once_and_reused",
    "test_toy.py::test_diagnose_the_shipped_default",
    "test_recipes.py::test_dpo_trains_on_the_real_data_path",
    "test_recipes.py::test_3ref_sft_trains_on_the_real_data_path",
    "test_inference.py::test_streamed_layers_equal_the_resident_run_bit_for_bit",
    "test_inference.py::test_int8_backbone_against_bf16",
    "test_recipes.py::test_validation_writes_samples_and_tensorboard_videos",
    "test_recipes.py::test_tiny_dpo_raises_the_reward_margin",
    "test_training.py::test_eight_devices_match_one",
    "test_inference.py::test_dry_run_compiles_every_stage_on_abstract_weights",
    "test_training.py::test_train_on_precomputed_wan_data",
    "test_recipes.py::test_lora_sft_trains_only_the_factors",
    "test_training.py::test_non_finite_loss_stops_without_poisoned_checkpoint",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.nodeid.split("tests/")[-1].split("[")[0]
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)
    items.sort(key=rank)  # stable: the rest keep their file order (module fixtures stay shared)
