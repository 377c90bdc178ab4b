"""benchmarks/gpu.sh must run on a fresh, offline GPU machine from the working tree alone: the rehearsal
runs it at tiny size on CPU in a clean copy of the tree (tracked and untracked-but-not-ignored files: no
benchmarks/official/, no ../shared), with `python3`, and with ml_collections, grain and
tensorflow_datasets made unimportable (the GPU image lacks them)."""
import json
import os
import shutil
import subprocess

from conftest import ROOT

PIECES = ["vs_official", "sampling", "train", "offload_encoders", "cache_warm", "offload_none", "offload_layers",
          "offload_int8"]


def clean_copy(dst):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if os.path.isfile(ROOT / name):
            os.makedirs(dst / os.path.dirname(name), exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


def test_gpu_session_rehearsal(tmp_path):
    """Every piece reports (none errs), the official one says it was skipped for want of its source; the
    sampling piece times all four stages, the warm-cache run starts faster than the cold one, and the
    markdown table names each piece."""
    tree = clean_copy(tmp_path / "tree")
    assert not (tree / "benchmarks" / "official").exists()
    blocked = tmp_path / "blocked"
    for name in ("ml_collections", "grain", "tensorflow_datasets"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not in the GPU image')\n")
    notes, out = tmp_path / "NOTES.md", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(blocked), "JAX_PLATFORMS": "cpu", "PYTHON": shutil.which("python3")}
    run = subprocess.run(["bash", "benchmarks/gpu.sh", "--tiny", "--notes", str(notes), "--out", str(out)],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["bench"] for r in results] == PIECES, run.stdout
    assert not [r for r in results if "error" in r], [r for r in results if "error" in r]
    by = {r["bench"]: r for r in results}
    assert "no official source in benchmarks/official" in by["vs_official"]["skipped"]
    assert len(by["sampling"]["stages"]) == 4 and by["sampling"]["estimate_50_steps_s"] > 50 * by["sampling"]["step_s"]
    assert by["train"]["moments"] == "bfloat16" and by["train"]["median_s"] > 0
    assert {by[f"offload_{m}"]["offload"] for m in ("none", "encoders", "layers", "int8")} == {
        "none", "encoders", "layers", "int8"}
    first = lambda r: next(iter(r["stages"].values()))["first_s"]  # noqa: E731
    assert by["cache_warm"]["cache"] and first(by["cache_warm"]) < first(by["offload_encoders"])
    table = notes.read_text()
    assert "tiny CPU rehearsal" in table and all(f"| {p} |" in table for p in PIECES)
    assert (out / "table.md").read_text() == table
    assert [json.loads(line)["bench"] for line in (out / "results.jsonl").read_text().splitlines()] == PIECES


def test_step_time_uses_the_recipe_optimizer():
    """benchmarks.step_time imports no config (ml_collections is not in the GPU image): its copy of the
    recipe's optimizer and scheduler must stay the recipe's."""
    from benchmarks.step_time import RECIPE_OPTIMIZER  # noqa: PLC0415
    from configs.cog_vap_train import COGVIDEOX_SCHEDULER, get_config  # noqa: PLC0415
    from vapjax.pipelines.cogvideox_vap import SCHEDULER  # noqa: PLC0415
    opt = get_config().optimizer
    assert {k: opt[k] for k in RECIPE_OPTIMIZER} == RECIPE_OPTIMIZER and SCHEDULER == COGVIDEOX_SCHEDULER
