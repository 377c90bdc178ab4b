"""Wan prompt encoding (vapjax.text): prompt_clean, UMT5 tokenisation and masked, zero-padded embeddings,
against the official code (stock diffusers' Wan pipeline has the same functions as WPIPE:94-106,
182-221) and the golden wan_pipeline_tiny trace."""
import json
import random
import sys
import types

import numpy as np
import pytest
import regex
from safetensors.numpy import load_file

from conftest import golden_dir, rel_err
from convert.t5 import convert_t5
from vapjax import checkpoint
from vapjax.text import _WHITESPACE, encode_umt5, prompt_clean, tokenize_umt5
from vapjax.tokenizer import T5Tokenizer

import torch  # noqa: E402 (test-only references)
import transformers  # noqa: E402
from diffusers.pipelines.wan import pipeline_wan_i2v as official  # noqa: E402

GOLDEN = golden_dir() / "wan_pipeline_tiny"

TRICKY = [
    "", "   ", "\t\n\r", "\u3000\u00a0",
    "A chestnut horse on a grassy hill.",
    "  leading,   inner\t\ttabs,\nnewlines\r\n and trailing  ",
    "Ã©tÃ© â€™ â€œquotedâ€\x9d cafÃ©",                     # UTF-8 read as cp1252 (mojibake)
    "&amp;amp;lt;b&amp;gt; &lt;i&gt; &#39;x&#39; &nbsp;y &quot;z&quot; &amp;#x41;",  # (double) HTML escapes
    "It&#8217;s &lt;&lt;&gt;&gt; l’été “curly” ‘quotes’",
    "a\u00a0b\u3000c\u2028d\u2029e\u202ff\u205fg\u1680h\u0085i",  # Unicode whitespace
    "file\u001cgroup\u001dunit\u001erecord\u001fsep",              # \s for `re`, not for `regex`
    "zero\u200bwidth\ufeffBOM \x00nul\x07bel\x7fdel",
    "cafe\u0301 naïve résumé Ångström", "日本語のテキストと中文 한국어", "emoji 😀🎉 and a flag 🇫🇷",
    "ＡＢＣ full width, ﬁ ligature, ①②, x²", "<pad> </s> <unk> inside text",
    "A very long prompt that goes on and on, " * 60,                 # > 512 tokens: truncated
]


def _random_texts(n, seed=0):
    pieces = ["a", "Hello", " world", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "&amp;", "&lt;", "&#39;",
              "&amp;lt;", "Ã©", "â€™", "’", "“", "\u0301", "é", "日本", "😀", "\u200b", "ﬁ", "Ａ", "\x9d", "</s>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 20))) for _ in range(n)]


# ---------------------------------------------------------------- prompt_clean

def test_whitespace_is_unicode_white_space():
    """Our spelled-out class collapses exactly what the `regex` module's \\s+ does, over all code points."""
    every = "".join(chr(c) for c in range(sys.maxunicode + 1))
    assert _WHITESPACE.sub(" ", every) == regex.sub(r"\s+", " ", every)


def test_prompt_clean_matches_official():
    for text in TRICKY + _random_texts(300):
        assert prompt_clean(text) == official.prompt_clean(text), repr(text)
    assert prompt_clean("Ã©tÃ© &amp;amp; a\u3000 b ") == "été & a b"  # the three steps do something


# ---------------------------------------------------------------- tokenisation

@pytest.fixture(scope="module")
def tokenizers():
    folder = str(GOLDEN / "tokenizer")
    return T5Tokenizer.from_folder(folder), transformers.T5Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("length", [512, 16])
def test_tokenizer_matches_transformers(tokenizers, length):
    ours, hf = tokenizers
    texts = TRICKY + _random_texts(100, seed=1)
    ids, mask = tokenize_umt5(ours, texts, length)
    want = hf([official.prompt_clean(t) for t in texts], padding="max_length", max_length=length,
              truncation=True, add_special_tokens=True, return_attention_mask=True)
    for text, got, w in zip(texts, ids, want["input_ids"]):
        assert got.tolist() == w, repr(text)
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert mask[0].sum() == 1 and ids[0, 0] == 1            # "" is just </s>
    assert mask[len(TRICKY) - 1].sum() == length             # the long prompt is truncated


# ---------------------------------------------------------------- embeddings

@pytest.fixture(scope="module")
def golden_encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("umt5")
    convert_t5(str(GOLDEN / "text_encoder"), str(out))
    return checkpoint.load(str(out), "t5_encoder")


def test_matches_official_prompt_embeds(tokenizers, golden_encoder):
    """The official `_get_t5_prompt_embeds` (clean, tokenise, masked UMT5, cut, zero-pad) on a batch of tricky prompts."""
    ours_tok, hf_tok = tokenizers
    cfg, params = golden_encoder
    pipe = types.SimpleNamespace(tokenizer=hf_tok, text_encoder=transformers.UMT5EncoderModel.from_pretrained(
        GOLDEN / "text_encoder", torch_dtype=torch.float32).eval())
    texts = TRICKY
    with torch.no_grad():
        want = official.WanImageToVideoPipeline._get_t5_prompt_embeds(
            pipe, texts, max_sequence_length=512, device=torch.device("cpu"), dtype=torch.float32).numpy()
    got = np.asarray(encode_umt5(ours_tok, cfg, params, texts, 512))
    lengths = tokenize_umt5(ours_tok, texts, 512)[1].sum(-1)
    assert got.shape == want.shape == (len(texts), 512, cfg.d_model)
    for row, n in enumerate(lengths):  # padding rows are exactly zero, real rows are not
        assert not got[row, n:].any() and not want[row, n:].any() and got[row, :n].any(-1).all()
    err = rel_err(got, want)
    print(f"official _get_t5_prompt_embeds, {len(texts)} prompts ({lengths.min()}..{lengths.max()} tokens): "
          f"fp32 rel err {err:.2e}")
    assert err <= 1e-5


def test_golden_wan_text(tokenizers, golden_encoder):
    case = json.loads((GOLDEN / "case.json").read_text())
    trace = load_file(GOLDEN / "trace.safetensors")
    length = case["call"]["max_sequence_length"]
    texts = {"prompt": case["call"]["prompt"], "prompt_mot_ref": case["call"]["prompt_mot_ref"][0],
             "negative_prompt": case["defaults"]["negative_prompt"],
             "negative_prompt_mot_ref": case["defaults"]["negative_prompt_mot_ref"]}
    tokenizer, (cfg, params) = tokenizers[0], golden_encoder
    for name, text in texts.items():
        ids, mask = tokenize_umt5(tokenizer, text, length)
        np.testing.assert_array_equal(ids, trace[f"input_ids.{name}"], err_msg=name)
        np.testing.assert_array_equal(mask, trace[f"attention_mask.{name}"], err_msg=name)
        got = np.asarray(encode_umt5(tokenizer, cfg, params, text, length))
        want = trace[name.replace("prompt", "prompt_embeds", 1)]
        n = int(mask.sum())
        assert not got[:, n:].any(), name
        err = rel_err(got, want)
        print(f"golden {name}: {n} tokens, embeds fp32 rel err {err:.2e}")
        assert err <= 1e-5, name
