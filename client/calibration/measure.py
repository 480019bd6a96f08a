"""Paired quality loss of starting from a cached donor at step K, against generating from scratch.

`measure` generates every prompt of a prompt set once from scratch (its own seed) and treats those
generations as the cache. Each prompt is then asked again as a request, with its own seed, and started
from its donors as the serving worker would start a hit:

- **whole**: the `donors` most similar other generations (full-prompt vectors), each at every K of
  `ks["whole"]`: x_K rebuilt from the donor's x0 with the request's noise;
- **composed**: the best object donor and the best background donor (top 3 of each part's vectors, the
  pair chosen by client/compose.py's rule, as `CacheBase.get` chooses), composed at step K;
- **partial_object**, **partial_background**: that part's best donor alone (compose.one_part).

For each start, the loss is score(the request from scratch) minus score(the request from the cached
start), same prompt and same seed, so each trial is paired: a loss of 0 means the cache changed
nothing the scorer sees. Every generation other than the request itself may be a donor, so a prompt
set with repeats and rewordings measures the similarities a serving trace brings.

Trials share donors (one generation serves many requests), so they are not independent: the
confidence intervals fit.py computes treat them as if they were, which the docs say.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import compose, masks
from ..prompt_split import split_prompt
from ..tables import TABLES
from .sampler import Sampler, score_all

__all__ = ["TABLES", "Measurement", "PromptVectors", "Trial", "best_pair", "default_ks", "measure", "start_latent"]

log = logging.getLogger("flexcache.client.calibration")


PART_DONORS = 3  # donors per part the pair is chosen from: the client's default top_k


@dataclass(frozen=True)
class Trial:
    """One paired measurement: a request started at step k from a donor of `table`'s kind."""

    table: str
    similarity: float  # whole and partial: the donor's; composed: the object donor's
    background_similarity: float  # composed: the background donor's; else 0
    k: int
    loss: float  # score from scratch minus score from the cached start (positive: the cache made it worse)
    request: int  # index into the prompt set
    donors: tuple[int, ...]


@dataclass
class Measurement:
    prompts: list[str]
    seeds: list[int]
    total_steps: int
    scratch: np.ndarray  # each request's score from scratch
    trials: list[Trial] = field(default_factory=list)
    videos_sampled: float = 0.0  # in from-scratch generations: a resume at K counts (N - K) / N
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{len(self.prompts)} prompts ({len(set(self.prompts))} distinct), {len(self.trials)} paired trials, "
                f"{self.videos_sampled:.0f} generations' worth of sampling, {self.seconds / 60:.1f} min; scores from "
                f"scratch {self.scratch.mean():.1f} on average.")


def default_ks(total_steps: int) -> dict[str, tuple[int, ...]]:
    """K grids: tenths of N for whole-prompt starts (up to 0.9 N), tenths up to half of N for composed and
    partial starts (a start assembled from other videos' parts loses its prompt's detail fast with K:
    docs/bench_composed.md)."""
    tenths = sorted({max(1, min(total_steps - 1, round(total_steps * f / 10))) for f in range(1, 10)})
    return {"whole": tuple(tenths), "composed": tuple(k for k in tenths if k <= total_steps / 2),
            "partial_object": tuple(k for k in tenths if k <= total_steps / 2),
            "partial_background": tuple(k for k in tenths if k <= total_steps / 2)}


@dataclass(frozen=True)
class _Start:
    table: str
    request: int
    donors: tuple[int, ...]
    similarity: float
    background_similarity: float


@dataclass(frozen=True)
class PromptVectors:
    """The vectors a serving worker looks up with: the whole prompt's, and its parts' (zero where the
    splitter found none, `has_object` / `has_background` false); a prompt is looked up by part only when
    it has both (`both`), but an entry with one part is that part's donor."""

    full: np.ndarray
    object: np.ndarray
    background: np.ndarray
    has_object: np.ndarray
    has_background: np.ndarray

    @property
    def both(self) -> np.ndarray:
        return self.has_object & self.has_background

    @classmethod
    def of(cls, sampler: Sampler, prompts: Sequence[str]) -> PromptVectors:
        full = sampler.embed(prompts)
        splits = [split_prompt(p) for p in prompts]
        parts = []
        for role in ("object", "background"):
            texts = [getattr(s, role) for s in splits]
            distinct = sorted({t for t in texts if t})
            vec = dict(zip(distinct, sampler.embed(distinct), strict=True)) if distinct else {}
            parts.append(np.stack([vec[t] if t else np.zeros(full.shape[1], np.float32) for t in texts]))
        return cls(full, parts[0], parts[1], np.array([bool(s.object) for s in splits]),
                   np.array([bool(s.background) for s in splits]))


def best_pair(object_similarity: np.ndarray, background_similarity: np.ndarray, object_masks: Sequence[np.ndarray],
              min_similarity: float = -np.inf) -> tuple[int, int] | None:
    """The composite's donors as the client picks them (CacheBase.get): among the top PART_DONORS of each
    part, the pair with the best compose.pair_score; None when no pair can be placed."""
    top_o = np.argsort(-object_similarity)[:PART_DONORS]
    top_b = np.argsort(-background_similarity)[:PART_DONORS]
    scored = [(compose.pair_score(object_similarity[o], background_similarity[b], object_masks[o],
                                  object_masks[b]), int(o), int(b))
              for o in top_o for b in top_b
              if object_similarity[o] >= min_similarity and background_similarity[b] >= min_similarity]
    scored = [t for t in scored if t[0] is not None]
    return max(scored)[1:] if scored else None


def start_latent(sampler: Sampler, table: str, x0: np.ndarray, object_masks: Sequence[np.ndarray],
                 donors: Sequence[int], seed: int, k: int) -> np.ndarray:
    """A request's step-k start from its donors (indices into x0), with the request's noise `seed`, as the
    serving worker builds a hit of `table`: a donor rebuilt at k; two donors composed at k; one part of a
    donor kept, the rest flattened (compose.one_part), rebuilt at k."""
    if table == "whole":
        return sampler.rebuild(x0[donors[0]], seed, k)
    if table == "composed":
        o, b = donors
        return compose.compose(sampler.rebuild(x0[o], seed, k), sampler.rebuild(x0[b], seed, k),
                               object_masks[o], object_masks[b])[0]
    j = donors[0]
    return sampler.rebuild(compose.one_part(x0[j], object_masks[j], table.removeprefix("partial_")), seed, k)


def measure(sampler: Sampler, scorer: object, prompts: Sequence[str], *, seeds: Sequence[int] | None = None,
            tables: Sequence[str] = TABLES, ks: Mapping[str, Sequence[int]] | None = None, donors: int = 2,
            min_similarity: float = 0.5, batch: int = 64,
            progress: Callable[[str], None] = log.info) -> Measurement:
    """Generate, start from donors, score: the trials fit.py turns into tables (module docstring)."""
    if len(prompts) < 2:
        raise ValueError("calibration needs at least two prompts (each is the other's donor)")
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown table {sorted(unknown)[0]!r}; the tables are {', '.join(TABLES)}")
    t0 = time.perf_counter()
    n, steps = len(prompts), sampler.total_steps
    prompts = list(prompts)
    seeds = list(range(1_000_000, 1_000_000 + n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    grid = {**default_ks(steps), **(ks or {})}

    progress(f"generating {n} prompts from scratch")
    parts_x0, scores = [], []
    for i in range(0, n, batch):
        made = sampler.generate(prompts[i:i + batch], seeds[i:i + batch])
        parts_x0.append(np.asarray(made.x0, dtype=np.float32))
        scores.append(score_all(scorer, prompts[i:i + batch], made.videos))
    x0, scratch = np.concatenate(parts_x0), np.concatenate(scores)
    result = Measurement(prompts, seeds, steps, scratch, videos_sampled=float(n))

    object_masks = [masks.estimate_object_mask(x) for x in x0]
    starts = _starts(PromptVectors.of(sampler, prompts), object_masks, tables, donors, min_similarity)
    for table in tables:
        chosen = [s for s in starts if s.table == table]
        for k in grid[table]:
            if not chosen:
                break
            progress(f"{table}: {len(chosen)} starts at K = {k}")
            for i in range(0, len(chosen), batch):
                part = chosen[i:i + batch]
                latents = np.stack([start_latent(sampler, s.table, x0, object_masks, s.donors, seeds[s.request], k)
                                    for s in part]).astype(np.float32)
                ps = [prompts[s.request] for s in part]
                made = sampler.resume(ps, [seeds[s.request] for s in part], latents, k)
                scores = score_all(scorer, ps, made.videos)
                result.trials += [Trial(s.table, s.similarity, s.background_similarity, k,
                                        float(scratch[s.request] - sc), s.request, s.donors)
                                  for s, sc in zip(part, scores, strict=True)]
            result.videos_sampled += len(chosen) * (steps - k) / steps
    result.seconds = time.perf_counter() - t0
    return result


def _starts(vectors: PromptVectors, object_masks: Sequence[np.ndarray], tables: Sequence[str], donors: int,
            min_similarity: float) -> list[_Start]:
    """Every start the plan measures: each request's donors, chosen as the serving worker would."""
    def similarities(table: np.ndarray, i: int, usable: np.ndarray | None = None) -> np.ndarray:
        sims = table @ table[i]
        sims[i] = -np.inf  # a request is never its own donor
        if usable is not None:
            sims[~usable] = -np.inf
        return sims

    out: list[_Start] = []
    for i in range(len(vectors.full)):
        if "whole" in tables:
            sims = similarities(vectors.full, i)
            out += [_Start("whole", i, (int(j),), float(sims[j]), 0.0)
                    for j in np.argsort(-sims)[:donors] if sims[j] >= min_similarity]
        if not vectors.both[i]:
            continue  # the worker looks up parts only for a prompt that has both
        so = similarities(vectors.object, i, vectors.has_object)
        sb = similarities(vectors.background, i, vectors.has_background)
        pair = best_pair(so, sb, object_masks, min_similarity) if "composed" in tables else None
        if pair is not None:
            out.append(_Start("composed", i, pair, float(so[pair[0]]), float(sb[pair[1]])))
        for table, sims in (("partial_object", so), ("partial_background", sb)):
            j = int(np.argsort(-sims)[0])
            if table in tables and sims[j] >= min_similarity:
                out.append(_Start(table, i, (j,), float(sims[j]), 0.0))
    return out
