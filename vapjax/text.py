"""Wan's prompt encoding: prompt cleaning, UMT5 tokenisation with a mask, masked UMT5, zeroed padding.

What the official Wan pipeline does to every caption (WPIPE:94-106, 182-221; spec §5.2), reproduced here:

1. `prompt_clean`: ftfy.fix_text (mojibake, HTML-escaped quotes, control characters, ...), then
   html.unescape applied twice, strip, then every run of Unicode whitespace becomes one space, strip;
2. tokenise to `max_length` (512): sentencepiece ids truncated to max_length - 1, `</s>`, `<pad>`
   padding; the attention mask is 1 on the real tokens including `</s>`;
3. the UMT5 encoder runs *with* that mask (pads attend to nothing and are not attended to);
4. rows at positions >= the true length are set to zero (the pipeline slices each sequence to its
   length and zero-pads it back to max_length).

Reference captions are encoded the same way, one per reference, and the pipeline concatenates the
references on the sequence axis ([B, N*512, D]).
"""
from __future__ import annotations

import html
import re
from functools import partial
from typing import Sequence

import ftfy
import jax
import jax.numpy as jnp

from vapjax.models.t5 import T5Config, T5Encoder
from vapjax.tokenizer import T5Tokenizer

# The official code uses the `regex` module, whose \s is Unicode's White_Space property; Python's
# `re` \s would also match U+001C..U+001F, so the class is spelled out.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def prompt_clean(text: str) -> str:
    """The official Wan `prompt_clean`."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


def tokenize_umt5(tokenizer: T5Tokenizer, prompts: str | Sequence[str], max_length: int = 512):
    """Cleaned, tokenised prompts: (ids, mask), int32 [B, max_length] each."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return tokenizer([prompt_clean(p) for p in prompts], max_length, return_mask=True)


@partial(jax.jit, static_argnums=0)
def _encode(cfg: T5Config, params, ids, mask):
    hidden = T5Encoder(cfg).apply({"params": params}, ids, mask)
    return jnp.where(mask[..., None].astype(bool), hidden, jnp.zeros((), hidden.dtype))


def encode_umt5(tokenizer: T5Tokenizer, cfg: T5Config, params: dict, prompts: str | Sequence[str],
                max_length: int = 512) -> jax.Array:
    """Wan prompt embeddings [B, max_length, d_model] in `cfg.dtype`: masked UMT5 over the cleaned
    prompts, zero past each prompt's true length (its tokens including `</s>`)."""
    ids, mask = tokenize_umt5(tokenizer, prompts, max_length)
    return _encode(cfg, params, jnp.asarray(ids), jnp.asarray(mask))

