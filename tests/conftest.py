import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def golden_dir() -> pathlib.Path:
    """Fixtures from the official implementation: $VAPJAX_GOLDEN_DIR, default ../shared/golden."""
    return pathlib.Path(os.environ.get("VAPJAX_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))


def golden_cases() -> list[pathlib.Path]:
    d = golden_dir()
    return sorted(p for p in d.iterdir() if (p / "case.json").exists()) if d.is_dir() else []


def rel_err(got, want) -> float:
    """‖got − want‖ / ‖want‖ in float64."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    except ImportError:
        pass
