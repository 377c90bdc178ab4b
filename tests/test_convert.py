"""The converter's shared parts: the safetensors reader refuses hostile files, dispatch is a table,
and every converter stores and records its dtype the same way."""
import hashlib
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import golden_dir
from convert import __main__ as cli
from convert.errors import ConversionError
from convert.source import MAX_HEADER_BYTES, SafetensorsFile, TensorSource
from vapjax import checkpoint


def one_line_error(call, message):
    with pytest.raises(ConversionError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("shard,message", [
    ("../outside.safetensors", "points outside the checkpoint folder"),
    ("sub/../../outside.safetensors", "points outside the checkpoint folder"),
    ("/etc/passwd", "is not a relative file name"),
    ("", "is not a relative file name"),
])
def test_index_shards_stay_inside_the_folder(tmp_path, shard, message):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"w": np.zeros(2, np.float32)}, tmp_path / "outside.safetensors")  # exists, must not be read
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    one_line_error(lambda: TensorSource.open(str(folder), stem="model"), message)


def test_index_shard_in_a_subfolder_is_fine(tmp_path):
    (tmp_path / "sub").mkdir()
    save_file({"w": np.arange(3, dtype=np.float32)}, tmp_path / "sub" / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "sub/a.safetensors"}}))
    np.testing.assert_array_equal(TensorSource.open(str(tmp_path), stem="model").load("w"), np.arange(3))


def _raw_file(path, header_len: int, body: bytes):
    path.write_bytes(struct.pack("<Q", header_len) + body)
    return str(path)


def test_header_length_is_bounded(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    ok = _raw_file(tmp_path / "ok.safetensors", len(header), header + b"\0" * 4)
    assert SafetensorsFile(ok).load("w").tolist() == [0.0]
    one_line_error(lambda: SafetensorsFile(_raw_file(tmp_path / "long.safetensors", len(header) + 100, header)),
                   "exceeds the file")
    huge = tmp_path / "huge.safetensors"  # a sparse file larger than the limit: the length alone is refused
    with open(huge, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 64)
    one_line_error(lambda: SafetensorsFile(str(huge)), "exceeds the 100 MB limit")


@pytest.mark.parametrize("offsets", [[0, 8], [4, 2], [0, 2]])
def test_byte_ranges_are_checked_before_reading(tmp_path, offsets):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}).encode()
    path = _raw_file(tmp_path / "bad.safetensors", len(header), header + b"\0" * 4)
    one_line_error(lambda: SafetensorsFile(path), "tensor 'w' has a bad byte range")


def test_dispatch_is_a_table(tmp_path, monkeypatch):
    """A new family's converter is one table entry; unknown classes and misplaced options are one line."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DMOTModel"}))
    one_line_error(lambda: cli.convert_folder(str(tmp_path), str(tmp_path / "out")),
                   "don't know how to convert a 'HunyuanVideoTransformer3DMOTModel' (known: CogVideoXTransformer3D*")
    calls = []
    monkeypatch.setitem(cli.MODELS, "HunyuanVideoTransformer3D*",
                        cli.Converter(lambda src, dst, **kw: calls.append((src, dst, kw)), expert_options=True))
    out = tmp_path / "out"
    assert cli.convert_folder(str(tmp_path), str(out), expert_layers=(0, 1)) == "HunyuanVideoTransformer3DMOTModel"
    [(src, dst, kw)] = calls  # written into a sibling of `out`, then renamed into place
    assert src == str(tmp_path) and kw == dict(dtype=None, init_expert=None, expert_layers=(0, 1))
    assert os.path.dirname(dst) == str(tmp_path) and dst != str(out) and out.is_dir() and not os.path.exists(dst)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"]}))
    one_line_error(lambda: cli.convert_folder(str(tmp_path), "out", init_expert="copy"),
                   "--init-expert/--expert-layers apply to a transformer, not a 'T5EncoderModel'")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoMOTPipeline"}))
    one_line_error(lambda: cli.convert_folder(str(tmp_path), "out"),
                   "don't know how to convert a 'HunyuanVideoMOTPipeline'")


def test_vae_follows_the_one_storage_dtype_rule(tmp_path):
    """Like the transformer and T5: a bf16 checkpoint stays bf16 and the stored dtype is recorded as
    both compute and parameter dtype, so `checkpoint.load` returns a consistent config."""
    src = golden_dir() / "cog_pipeline_tiny" / "vae"
    (tmp_path / "src").mkdir()
    sd = load_file(src / "diffusion_pytorch_model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, tmp_path / "src" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "src" / "config.json").write_text((src / "config.json").read_text())
    assert cli.convert_folder(str(tmp_path / "src"), str(tmp_path / "out")) == "AutoencoderKLCogVideoX"
    cfg, params = checkpoint.load(str(tmp_path / "out"), "cogvideox_vae")
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    cli.convert_folder(str(src), str(tmp_path / "out32"))
    cfg32, _ = checkpoint.load(str(tmp_path / "out32"), "cogvideox_vae")
    assert cfg32.dtype == cfg32.param_dtype == "float32"


def test_pipeline_folder_is_checked_before_any_weight(tmp_path):
    """Whole-pipeline conversion (a PipelineSpec per class): a missing component folder, an unexpected
    component and a bad image processor or scheduler are one line, before any weights are read."""
    golden = golden_dir() / "wan_pipeline_tiny"
    src = tmp_path / "src"
    src.mkdir()
    for part in ("transformer", "vae", "text_encoder", "image_encoder", "tokenizer", "scheduler"):
        (src / part).symlink_to(golden / part)
    index = json.loads((golden / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps(index))
    one_line_error(lambda: cli.convert_folder(str(src), str(tmp_path / "out")), "pipeline folder lacks image_processor")
    (src / "image_processor").mkdir()
    (src / "image_processor" / "preprocessor_config.json").write_text('{"image_processor_type": "SiglipImageProcessor"}')
    one_line_error(lambda: cli.convert_folder(str(src), str(tmp_path / "out")), "not a CLIPImageProcessor")
    (src / "model_index.json").write_text(json.dumps({**index, "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    one_line_error(lambda: cli.convert_folder(str(src), str(tmp_path / "out")), "unexpected components transformer_2")
    assert not (tmp_path / "out").exists()


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_conversion_leaves_the_destination_as_it_was(tmp_path, capsys):
    """Converting onto a good pipeline from a source with a corrupt VAE fails before anything is written
    (every source file is checked first; the output goes to a sibling folder renamed into place); a good
    conversion then replaces what the earlier one wrote and keeps the user's own files."""
    golden = golden_dir() / "cog_pipeline_tiny"
    out = tmp_path / "out"
    assert cli.main([str(golden), str(out)]) == 0
    (out / "transformer" / "params" / "notes.txt").write_text("mine")
    (out / "README.txt").write_text("mine too")
    before = _snapshot(out)

    src = tmp_path / "src"
    shutil.copytree(golden, src, ignore=shutil.ignore_patterns("*.mp4", "*.png", "trace.safetensors"))
    vae = src / "vae" / "diffusion_pytorch_model.safetensors"
    os.chmod(vae, 0o644)
    good = vae.read_bytes()
    vae.write_bytes(good[:-100])  # truncated: the last tensor's bytes run past the end of the file
    capsys.readouterr()
    assert cli.main([str(src), str(out), "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad byte range" in err and "vae" in err, err
    assert _snapshot(out) == before  # the transformer was not replaced by a bf16 one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no partial output left over

    vae.write_bytes(good)
    assert cli.main([str(src), str(out), "--dtype", "bf16"]) == 0
    assert (out / "transformer" / "params" / "notes.txt").read_text() == "mine"
    assert (out / "README.txt").read_text() == "mine too"
    for part in ("transformer", "vae", "text_encoder"):
        assert json.loads((out / part / "config.json").read_text())["config"]["param_dtype"] == "bfloat16", part
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_conversion_never_replaces_a_file_it_did_not_write(tmp_path):
    """A folder whose config.json is the user's (no conversion recorded writing it) is refused, untouched."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("mine")
    one_line_error(lambda: cli.convert_folder(str(golden_dir() / "cog_pipeline_tiny" / "vae"), str(tmp_path / "out")),
                   "holds files that no earlier conversion wrote and that this one would replace: config.json")
    assert _snapshot(tmp_path) == {"out/config.json": hashlib.sha256(b"mine").hexdigest()}
