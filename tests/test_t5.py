"""T5 / UMT5 text encoder, tokenizer and converter: parity with transformers and the golden pipeline."""
import copy
import json
import random
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import golden_dir, rel_err
from convert.errors import ConversionError
from convert.t5 import convert_t5
from vapjax import checkpoint
from vapjax.models.t5 import T5Config, T5Encoder
from vapjax.tokenizer import T5Tokenizer

import torch  # noqa: E402 (test-only references)
import transformers  # noqa: E402

GOLDEN = golden_dir() / "cog_pipeline_tiny"

VARIANTS = {  # name: (transformers config class, model class, feed_forward_proj)
    "t5_gated_gelu": ("T5Config", "T5EncoderModel", "gated-gelu"),
    "t5_relu": ("T5Config", "T5EncoderModel", "relu"),
    "umt5": ("UMT5Config", "UMT5EncoderModel", "gated-gelu"),
}
SEQ = 48  # longer than max_distance below: the logarithmic and the clamped buckets are exercised


def _randomize(model, seed):
    """Weights far from transformers' init: norm scales 1+0.1N, bias tables N, matrices N/sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif "relative_attention_bias" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (transformers model, its save_pretrained folder, our converted folder)."""
    out = {}
    for seed, (name, (config_cls, model_cls, ffn)) in enumerate(VARIANTS.items()):
        cfg = getattr(transformers, config_cls)(
            vocab_size=96, d_model=32, d_kv=8, num_heads=3, d_ff=40, num_layers=3, feed_forward_proj=ffn,
            relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0)
        model = getattr(transformers, model_cls)(cfg).eval()
        _randomize(model, seed)
        src, dst = tmp_path_factory.mktemp(f"{name}_hf"), tmp_path_factory.mktemp(f"{name}_jax")
        model.save_pretrained(src)
        convert_t5(str(src), str(dst))
        out[name] = (model, src, dst)
    return out


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    mask[1, 30:] = 0   # right padding
    mask[1, 5] = 0     # and a hole
    return ids, mask


# ---------------------------------------------------------------- (a) parity with transformers

@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_parity_with_transformers(tiny, name, masked):
    model, _, dst = tiny[name]
    ids, mask = _inputs()
    with torch.no_grad():
        want = model(torch.tensor(ids), attention_mask=torch.tensor(mask) if masked else None)
    cfg, params = checkpoint.load(str(dst), "t5_encoder")
    got = T5Encoder(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask) if masked else None)
    err = rel_err(got, want.last_hidden_state.numpy())
    print(f"{name} {'mask' if masked else 'no mask'}: fp32 rel err {err:.2e}")
    assert err <= 1e-5


def test_per_layer_bias_flag_and_config_round_trip(tiny):
    _, src, dst = tiny["umt5"]
    cfg = checkpoint.load(str(dst), "t5_encoder")[0]
    assert cfg.per_layer_position_bias and not checkpoint.load(str(tiny["t5_relu"][2]), "t5_encoder")[0].gated
    assert T5Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hf = json.loads((src / "config.json").read_text())
    assert T5Config.from_transformers(hf) == cfg


# ---------------------------------------------------------------- (e) bfloat16

def test_bfloat16_close_to_float32(tiny):
    model, _, dst = tiny["t5_gated_gelu"]
    ids, mask = _inputs()
    cfg32, p32 = checkpoint.load(str(dst), "t5_encoder")
    cfg16, p16 = checkpoint.load(str(dst), "t5_encoder", dtype="bfloat16")
    want = T5Encoder(cfg32).apply({"params": p32}, jnp.asarray(ids), jnp.asarray(mask))
    got = T5Encoder(cfg16).apply({"params": p16}, jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.bfloat16 and p16["final_norm"]["scale"].dtype == jnp.bfloat16
    err = rel_err(got.astype(jnp.float32), want)
    with torch.no_grad():  # transformers' own bfloat16 error on the same model, for scale
        hf16 = copy.deepcopy(model).to(torch.bfloat16)(torch.tensor(ids), attention_mask=torch.tensor(mask))
    hf_err = rel_err(hf16.last_hidden_state.float().numpy(), want)
    print(f"bf16 vs fp32 rel err: ours {err:.2e}, transformers {hf_err:.2e}")
    assert err <= 0.05 and err <= 2 * hf_err


# ---------------------------------------------------------------- (d) converter errors

def _write_variant(tiny, tmp_path, edit):
    _, src, _ = tiny["t5_gated_gelu"]
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    shutil.copy(src / "config.json", tmp_path / "config.json")
    save_file(tensors, tmp_path / "model.safetensors")
    return str(tmp_path)


Q1 = "encoder.block.1.layer.0.SelfAttention.q.weight"
WO0 = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
EXTRA = "encoder.block.3.layer.0.SelfAttention.q.weight"
TIED = "encoder.embed_tokens.weight"


@pytest.mark.parametrize("edit,key,what", [
    (lambda t: t.pop(Q1), Q1, "missing keys"),
    (lambda t: t.update({EXTRA: t[Q1]}), EXTRA, "unexpected keys"),
    (lambda t: t.update({WO0: np.ascontiguousarray(t[WO0].T)}), WO0, "wrong shape"),
    (lambda t: t.update({TIED: t["shared.weight"] + 1}), TIED, "must be tied"),
], ids=["missing", "unexpected", "wrong_shape", "untied"])
def test_converter_errors(tiny, tmp_path, edit, key, what):
    src = _write_variant(tiny, tmp_path, edit)
    with pytest.raises(ConversionError) as e:
        convert_t5(src, str(tmp_path / "out"))
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and key in msg and what in msg


@pytest.mark.parametrize("edit", [
    lambda t: t.update({TIED: t["shared.weight"].copy()}),  # both copies
    lambda t: t.update({TIED: t.pop("shared.weight")}),     # only the encoder's
], ids=["both", "only_encoder_key"])
def test_tied_embedding_layouts(tiny, tmp_path, edit):
    _, _, reference = tiny["t5_gated_gelu"]
    src = _write_variant(tiny, tmp_path, edit)
    convert_t5(src, str(tmp_path / "out"))
    got = checkpoint.load(str(tmp_path / "out"), "t5_encoder")[1]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(got, checkpoint.load(str(reference), "t5_encoder")[1]["embed_tokens"]["embedding"])


def test_bfloat16_checkpoint_stays_bfloat16(tiny, tmp_path):
    model, _, _ = tiny["umt5"]
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    cfg = convert_t5(str(tmp_path / "hf"), str(tmp_path / "out"))
    params = checkpoint.load(str(tmp_path / "out"), "t5_encoder")[1]
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    assert params["blocks"]["relative_attention_bias"]["embedding"].dtype == jnp.bfloat16


# ---------------------------------------------------------------- (b) tokenizer parity

TEXTS = [
    "A chestnut horse on a grassy hill.",
    "",
    "   ",
    "\t\n",
    "café naïve résumé Ångström déjà vu, cafe\u0301",
    "日本語のテキストと中文",
    "emoji 😀🎉 and a flag 🇫🇷",
    "Mixed: Ελληνικά, русский, ＡＢＣ full width, ﬁ ligature, x\u00a0y, a\u3000b, zero\u200bwidth",
    "a</s>b", "a </s> b", "</s>", "ends with </s>", "<pad> x <unk>", "</s >", "<s>", "<extra_id_0>",
    "  leading and trailing  ", "tabs\tand\nnewlines", "▁under score",
    "A very long prompt that goes on and on, " * 12,
]


@pytest.fixture(scope="module")
def tokenizers():
    folder = str(GOLDEN / "tokenizer")
    return T5Tokenizer.from_folder(folder), transformers.T5Tokenizer.from_pretrained(folder)


def _hf_ids(hf, texts, length):
    enc = hf(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True)
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


@pytest.mark.parametrize("length", [16, 64])
def test_tokenizer_matches_transformers(tokenizers, length):
    ours, hf = tokenizers
    ids, mask = ours(TEXTS, length, return_mask=True)
    want_ids, want_mask = _hf_ids(hf, TEXTS, length)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), length)
    for text, got, want in zip(TEXTS, ids, want_ids):
        assert got.tolist() == want.tolist(), text
    np.testing.assert_array_equal(mask, want_mask)


def test_tokenizer_random_strings(tokenizers):
    # No stray combining marks: after compatibility characters (Ａ, ﬁ, NBSP) transformers' `tokenizers`
    # normaliser and sentencepiece (which we and the official pipeline use) disagree on those.
    ours, hf = tokenizers
    alphabet = list("abcXYZ  \t\n.,!?'\"-éèçñü日本語😀🎉\u00a0\u3000\u200bﬁＡ①²ΩЖ<>/s▁") + [
        "</s>", "<pad>", "<unk>", "<extra_id_0>", "Hello", " world"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    np.testing.assert_array_equal(ours(texts, 24), _hf_ids(hf, texts, 24)[0])


def test_tokenizer_sentinels(tmp_path):
    """extra_ids > 0, written as transformers saves it (as CogVideoX's tokenizer, with 100)."""
    shutil.copytree(GOLDEN / "tokenizer", tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    size, n = 448, 5  # the golden sentencepiece vocabulary; 5 sentinels
    config["extra_ids"] = n
    config["additional_special_tokens"] = [f"<extra_id_{i}>" for i in range(n)]
    for i in range(n):
        config["added_tokens_decoder"][str(size + n - 1 - i)] = {
            "content": f"<extra_id_{i}>", "lstrip": True, "normalized": False, "rstrip": True,
            "single_word": False, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    texts = ["a <extra_id_0> b", "x<extra_id_4>y", "<extra_id_1><extra_id_2>", "<extra_id_5> is text",
             " <extra_id_3> </s>"]
    ours = T5Tokenizer.from_folder(str(tmp_path))
    got = ours(texts, 12)
    np.testing.assert_array_equal(got, _hf_ids(transformers.T5Tokenizer.from_pretrained(str(tmp_path)), texts, 12)[0])
    assert got[0].tolist()[:3] == [4, size + n - 1, 117]  # <extra_id_0> is the last id


def test_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer folder"):
        T5Tokenizer.from_folder(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no spiece.model"):
        T5Tokenizer.from_folder(str(tmp_path))


# ---------------------------------------------------------------- (c) golden pipeline case

def _golden_prompts(case):
    """Each traced text input -> its list of texts (one per reference for the *_mot_ref prompts)."""
    out = {}
    for name in ("prompt", "negative_prompt", "prompt_mot_ref", "negative_prompt_mot_ref"):
        text = case["defaults"][name] if name in case.get("defaults", {}) else case["call"][name]
        out[name] = text if isinstance(text, list) else [text]
    return out


def test_golden_text_encoding(tmp_path):
    case = json.loads((GOLDEN / "case.json").read_text())
    length = case["call"]["max_sequence_length"]
    trace = load_file(GOLDEN / "trace.safetensors")
    tokenizer = T5Tokenizer.from_folder(str(GOLDEN / "tokenizer"))
    convert_t5(str(GOLDEN / "text_encoder"), str(tmp_path / "te"))
    cfg, params = checkpoint.load(str(tmp_path / "te"), "t5_encoder")
    encoder = T5Encoder(cfg)
    for name, texts in _golden_prompts(case).items():
        ids = tokenizer(texts, length)                       # [refs, L]
        np.testing.assert_array_equal(ids.reshape(1, -1), trace[f"input_ids.{name}"], err_msg=name)
        embeds = encoder.apply({"params": params}, jnp.asarray(ids))  # refs concatenate on the sequence axis
        want = trace[name.replace("prompt", "prompt_embeds", 1)]
        err = rel_err(np.asarray(embeds).reshape(want.shape), want)
        print(f"golden {name}: {int((ids != tokenizer.pad_id).sum())} tokens, embeds fp32 rel err {err:.2e}")
        assert err <= 1e-5, name
