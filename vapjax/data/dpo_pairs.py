"""Diffusion-DPO pairs from VAP-Data (spec §7.8, DS:839-1173): (win, lose, reference) per row, with a weight.

Every video of the CSV with a reference-alignment score > 0 (any split) is a candidate. For a row of kind
k in epoch e, with (pos_min, neg_max) = (90, 10) for the first two epochs and (80, 30) after:
  win   uniform among kind-k videos with score ≥ pos_min
  lose  uniform among kind-k videos with score ≤ neg_max, ≠ win
  ref   uniform among kind-k videos with score == 100, else with 80 < score < 100, ∉ {win, lose}
  w     (|s_w − s_l|·0.02 / √(p_w·p_l))^1, p = the frequency of a score's 10-point bin (100 is its own bin)
A row without a candidate is skipped, as the official loader skips it.

`DPOPairs` reads the examples from a prepared dataset (vap_latents) by name, the scores and kinds from
its CSV, and yields batches of P pairs in the format of `vapjax.training.cogvideox_dpo_inputs`: target
fields with a pair axis [P, 2, …] (win, lose), reference fields `ref_<field>` [P, 1, …], `pair_weight`
[P]. Build the dataset with every split and every score kept (`python -m vapjax.data.vap_data ...
--config 49x480x720_all`: score > 0, the official DPO filter) so that the pools hold every candidate;
only its train-split examples are rows. Draws are seeded by (seed, position), so the iterator resumes
exactly from `get_state()`.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import math
import random
from typing import Any, Mapping, Sequence

import jax
import numpy as np

# (epochs, pos_min, neg_max) of the official schedule; the last stage lasts forever.
STAGES = ((2, 90, 10), (None, 80, 30))


@dataclasses.dataclass(frozen=True)
class Pair:
    win: str
    lose: str
    ref: str
    weight: float


class PairSampler:
    """The official draw over {path: score} and {path: kind}."""

    def __init__(self, scores: Mapping[str, float], kinds: Mapping[str, str], *, stages=STAGES, scale: float = 0.02,
                 power: float = 1.0, bin_width: int = 10, eps: float = 1e-8):
        self.scores = {p: float(s) for p, s in scores.items() if float(s) > 0}   # the official threshold 0
        self.kinds = {p: kinds[p] for p in self.scores}
        self.stages, self.scale, self.power, self.eps = stages, scale, power, eps
        bins = {p: min(int(min(max(s, 0.0), 100.0)) // bin_width, 100 // bin_width) for p, s in self.scores.items()}
        counts = collections.Counter(bins.values())
        self.prob = {p: counts[b] / len(bins) for p, b in bins.items()}
        self.by_kind = collections.defaultdict(list)
        for p in sorted(self.scores):
            self.by_kind[self.kinds[p]].append(p)

    def stage(self, epoch: int) -> tuple[int, int]:
        start = 0
        for epochs, pos_min, neg_max in self.stages:
            if epochs is None or epoch < start + epochs:
                return pos_min, neg_max
            start += epochs
        return self.stages[-1][1:]

    def weight(self, win: str, lose: str) -> float:
        prob = math.sqrt(max(self.prob[win], self.eps) * max(self.prob[lose], self.eps))
        return (abs(self.scores[win] - self.scores[lose]) * self.scale / max(prob, self.eps)) ** self.power

    @functools.lru_cache(maxsize=None)
    def pools(self, kind: str, pos_min: int, neg_max: int) -> tuple[list[str], ...]:
        """(win, lose, score-100 reference, 80 < score < 100 reference) candidates of a kind."""
        videos = self.by_kind.get(kind, [])
        return ([v for v in videos if self.scores[v] >= pos_min], [v for v in videos if self.scores[v] <= neg_max],
                [v for v in videos if self.scores[v] == 100], [v for v in videos if 80 < self.scores[v] < 100])

    def sample(self, kind: str, epoch: int, rng: random.Random) -> Pair | None:
        pos, neg, *refs = self.pools(kind, *self.stage(epoch))
        if not pos or not neg:
            return None
        win = rng.choice(pos)
        lose = [v for v in neg if v != win]
        if not lose:
            return None
        lose = rng.choice(lose)
        for pool in refs:
            pool = [v for v in pool if v not in (win, lose)]
            if pool:
                return Pair(win, lose, rng.choice(pool), self.weight(win, lose))
        return None


def read_scores(csv_path: str) -> tuple[dict[str, float], dict[str, str]]:
    """({path: reference_alignment_score}, {path: kind}) of a VAP-Data CSV (unparsable scores left out)."""
    scores, kinds = {}, {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            try:
                scores[rec["video_paths"]] = float(rec["reference_alignment_score"])
            except (TypeError, ValueError):
                continue
            kinds[rec["video_paths"]] = rec["kind"]
    return scores, kinds


class DPOPairs:
    """Batches of `batch_size` pairs over a random-access `source` (a sequence of records with `fields`),
    whose example i is the video `paths[i]`.

    Candidates are the examples whose path has a score in `scores` (> 0); `kinds` ({path: kind}, the
    CSV's) puts them in their kind's pool. The rows of an epoch are the examples of split "train"
    (`splits`, default all), the official rows (DS:919-926), in a seeded order, strided over hosts.
    Nothing is read at construction: the example names come from the dataset's index
    (`loader.example_index`). `prefetch` batches are read ahead on `workers` threads.
    """

    def __init__(self, source: Sequence[Mapping[str, Any]], paths: Sequence[str], scores: Mapping[str, float],
                 kinds: Mapping[str, str], fields: Sequence[str], *, batch_size: int, seed: int,
                 splits: Sequence[str] | None = None, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 2, workers: int = 4):
        if len(paths) != len(source):
            raise ValueError(f"{len(paths)} example names for a dataset of {len(source)} examples")
        self.source, self.fields, self.batch_size, self.seed = source, tuple(fields), batch_size, seed
        self.index = {p: i for i, p in enumerate(paths)}
        known = {p: s for p, s in scores.items() if p in self.index and p in kinds}
        self.sampler = PairSampler(known, kinds)
        self.rows = [i for i, p in enumerate(paths) if splits is None or splits[i] == "train"]
        self.row_kinds = [kinds.get(paths[i]) for i in self.rows]
        if not self.rows:
            raise ValueError("no DPO rows: the dataset has no example of split 'train'")
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.position = self.process_index    # global row counter of the next batch, this host's stride
        if not any(self.sampler.sample(k, 0, random.Random(0)) for k in set(self.row_kinds) if k is not None):
            raise ValueError("no DPO pair can be drawn: no kind has both a win (score >= 90) and a lose "
                             "(score <= 10) video and a reference (score > 80); was the dataset built with "
                             "every split and score threshold 0 (vap_data --config 49x480x720_all)?")
        self.prefetch = prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dpo_pairs")
        self._pending = collections.deque()   # (position after the batch, pairs, {example: future record})
        self._planned = self.position
        self._order = (None, None)

    def _row(self, position: int) -> Pair | None:
        epoch, k = divmod(position, len(self.rows))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.rows)))
        kind = self.row_kinds[self._order[1][k]]
        return None if kind is None else self.sampler.sample(kind, epoch, random.Random(f"{self.seed}/{position}"))

    def _plan(self) -> None:
        """Draw the next batch's pairs and start reading its records."""
        pairs, position = [], self._planned
        while len(pairs) < self.batch_size:
            pair = self._row(position)
            position += self.process_count
            if pair is not None:
                pairs.append(pair)
        names = {v for p in pairs for v in (p.win, p.lose, p.ref)}
        reads = {v: self._pool.submit(self.source.__getitem__, self.index[v]) for v in sorted(names)}
        self._pending.append((position, pairs, reads))
        self._planned = position

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while len(self._pending) < 1 + self.prefetch:
            self._plan()
        self.position, pairs, reads = self._pending.popleft()
        records = {v: f.result() for v, f in reads.items()}
        out = collections.defaultdict(list)
        for p in pairs:
            win, lose, ref = (records[v] for v in (p.win, p.lose, p.ref))
            for f in self.fields:
                out[f].append(np.stack([np.asarray(win[f]), np.asarray(lose[f])]))
                out["ref_" + f].append(np.asarray(ref[f])[None])
            out["pair_weight"].append(np.float32(p.weight))
            out["index"].append(np.array([self.index[p.win], self.index[p.lose]]))
            out["ref_index"].append(np.array([self.index[p.ref]]))
        return {k: np.stack(v) for k, v in out.items()}

    def get_state(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        for _, _, reads in self._pending:
            for f in reads.values():
                f.cancel()
        self._pending.clear()
        self.position = self._planned = int(state["position"])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
