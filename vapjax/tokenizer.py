"""T5 / UMT5 tokenizer over a checkpoint's `spiece.model`, without transformers.

Reproduces transformers' `T5Tokenizer` as the pipelines call it
(`padding="max_length", max_length=L, truncation=True, add_special_tokens=True`):

1. the text is split on the special tokens written literally in it (`<pad>`, `</s>`, `<unk>`, the
   `<extra_id_N>` sentinels and any other added token; leftmost, longest match first), each of which
   becomes its own id;
2. every span between them is encoded independently by sentencepiece (which normalises, drops
   redundant whitespace and prepends the word-boundary marker), i.e. the "legacy" T5 segmentation:
   what transformers >= 5 does for every `legacy` setting and transformers 4's sentencepiece
   tokenizer does for `legacy=True` (the CogVideoX and golden tokenizers). transformers 4 with
   `legacy=False` would differ only for text written directly after a special-token literal;
3. the ids are truncated to L-1, `</s>` is appended and the row is right-padded with `<pad>` to L.

Sentinel `<extra_id_N>` has id `sp_vocab + extra_ids - 1 - N` (the last vocabulary slots, in reverse),
unless `tokenizer_config.json`'s `added_tokens_decoder` says otherwise. The `lstrip`/`rstrip` flags of
added tokens are not needed: sentencepiece already ignores whitespace at the ends of a span.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np
import sentencepiece as spm


def _content(token) -> str:
    """A token as written in tokenizer configs: a string or an AddedToken dict."""
    return token["content"] if isinstance(token, dict) else str(token)


class T5Tokenizer:
    """`T5Tokenizer.from_folder(path)(texts, max_length)` -> int32 ids [B, max_length]."""

    def __init__(self, spiece_model: str, *, pad_token: str = "<pad>", eos_token: str = "</s>",
                 unk_token: str = "<unk>", extra_ids: int = 100,
                 additional_special_tokens: Sequence[str] = (), added_tokens: dict[str, int] | None = None):
        self._sp = spm.SentencePieceProcessor(model_file=spiece_model)
        size = self._sp.get_piece_size()
        special = dict(added_tokens or {})
        for i in range(extra_ids):
            special.setdefault(f"<extra_id_{i}>", size + extra_ids - 1 - i)
        for tok in (pad_token, eos_token, unk_token, *additional_special_tokens):
            if tok not in special:
                special[tok] = self._sp.piece_to_id(tok)
                if special[tok] == self._sp.unk_id() and tok != unk_token:
                    raise ValueError(f"{spiece_model}: special token {tok!r} has no id (not in the "
                                     f"sentencepiece vocabulary nor in added_tokens_decoder)")
        self._special = special
        self.pad_id, self.eos_id = special[pad_token], special[eos_token]
        by_length = sorted(special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")

    @classmethod
    def from_folder(cls, path: str) -> "T5Tokenizer":
        """A transformers tokenizer folder: spiece.model (+ tokenizer_config.json, special_tokens_map.json)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such tokenizer folder")
        model = os.path.join(path, "spiece.model")
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{path}: no spiece.model (a sentencepiece T5 tokenizer folder is required)")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file) as f:
                    config.update(json.load(f))
        kwargs = {k: _content(config[k]) for k in ("pad_token", "eos_token", "unk_token") if config.get(k)}
        added = {_content(t): int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
        extra = config.get("extra_special_tokens") or {}  # transformers >= 4.5x: a list, or a dict of named ones
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        additional = [_content(t) for t in (config.get("additional_special_tokens") or []) + extra]
        return cls(model, extra_ids=config.get("extra_ids", 100), additional_special_tokens=additional,
                   added_tokens=added, **kwargs)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text: no `</s>`, no truncation, no padding."""
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._special[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int, return_mask: bool = False):
        """ids int32 [B, max_length] (and the attention mask, 1 on tokens incl. `</s>`, if asked)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for </s>), got {max_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.full((len(texts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            seq = self.encode(text)[:max_length - 1] + [self.eos_id]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return (ids, mask) if return_mask else ids
