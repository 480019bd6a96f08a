"""Request traces for cache benchmarks, built from public text-to-video prompt suites.

No real text-to-video request log (with timestamps) is available, so a trace is synthesised with a
stated popularity model:

* An *intent* is one prompt of a suite together with its LLM rewrites (VBench ships line-aligned
  rewrites of every prompt: GPT-4o "longer", Hunyuan, Wan2.1/Qwen; VBench-2.0 ships two). The
  rewrites are paraphrases of the same request, the way different users word the same idea.
  Open-Sora and FETV prompts have no rewrites: they are intents with one paraphrase.
* Intents are ranked by a seeded random permutation (so popularity is unrelated to file order) and
  drawn with Zipf probabilities p(rank r) proportional to r ** -s.
* Each request picks one of its intent's paraphrases uniformly.
* The first `warmup` requests fill the cache and are kept apart from the measured part.

A second, repeat-free model follows Chai's protocol (BRIEF: "100 prompts cached, then 1,000 new
prompts"): distinct intents in a seeded order, each requested once in its original wording, the
first `cached` of them as warm-up. Nothing is asked twice and no rewrite of a cached prompt comes
back, so every hit is an approximate one.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).parent / "prompts"  # vendored suites, unchanged copies: see prompts/NOTICE.md

# (source name, original list, rewrites line-aligned with it), paths relative to the data folder.
_VB = "vbench/prompts"
_VB2 = "vbench/VBench-2.0/prompts"
ALIGNED_SUITES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vbench-dimension", f"{_VB}/all_dimension.txt", (
        f"{_VB}/augmented_prompts/hunyuan_all_dimension.txt",
        f"{_VB}/augmented_prompts/gpt_enhanced_prompts/all_dimension_longer.txt",
        f"{_VB}/augmented_prompts/Wan2.1-T2V-1.3B/all_dimension_aug_wanx_seed42.txt",
    )),
    ("vbench-category", f"{_VB}/all_category.txt", (
        f"{_VB}/augmented_prompts/gpt_enhanced_prompts/all_category_longer.txt",
    )),
    ("vbench2", f"{_VB2}/VBench2_full_text.txt", (
        f"{_VB2}/prompt_aug/VBench2_full_text_aug.txt",
        f"{_VB2}/prompt_aug/Wanx_full_text_aug.txt",
    )),
)
_SEGMENT = re.compile(r"\|\d+\|")  # Open-Sora's multi-segment lines: "|0|A car ...|2|A car ..."


@dataclass(frozen=True)
class Intent:
    """One request idea and the different wordings users send for it (first = the suite's original)."""

    source: str
    paraphrases: tuple[str, ...]


@dataclass(frozen=True)
class Request:
    intent: int      # index into Trace.intents
    paraphrase: int  # index into that intent's paraphrases
    text: str


@dataclass(frozen=True)
class Trace:
    """A request sequence: requests[:warmup] warm the cache, requests[warmup:] are measured."""

    intents: tuple[Intent, ...]
    requests: tuple[Request, ...]
    warmup: int
    zipf_s: float  # 0.0 for the repeat-free (cold) protocol
    seed: int
    popularity: str = ""  # how requests were drawn, for reports; empty: Zipf with zipf_s

    @property
    def label(self) -> str:
        return self.popularity or f"Zipf s = {self.zipf_s}"

    @property
    def measured(self) -> tuple[Request, ...]:
        return self.requests[self.warmup:]

    def unique_texts(self) -> list[str]:
        """Distinct prompt texts of the whole trace, in first-request order."""
        return list(dict.fromkeys(r.text for r in self.requests))


def _clean(text: str) -> str:
    return " ".join(text.split())


def _lines(path: Path) -> list[str]:
    return [_clean(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _open_sora(root: Path) -> list[str]:
    """Open-Sora's prompt lists: .txt one per line (JSON options and segment markers removed), .csv `text`."""
    folder = root / "open-sora/assets/texts"
    out: list[str] = []
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("{", 1)[0]  # trailing reference/mask options
            out.extend(_clean(seg) for seg in _SEGMENT.split(line))
    for path in sorted(folder.glob("*.csv")):
        with path.open(encoding="utf-8", newline="") as f:
            out.extend(_clean(row["text"]) for row in csv.DictReader(f))
    return out


def _fetv(root: Path) -> list[str]:
    path = root / "fetv/fetv_data.json"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [_clean(json.loads(line)["prompt"]) for line in lines if line.strip()]


def load_intents(root: Path = DEFAULT_DATA) -> list[Intent]:
    """All intents of the VBench, VBench-2.0, Open-Sora and FETV suites.

    Texts are whitespace-normalised; intents whose original text repeats (within or across suites)
    are merged; a text is kept in the first intent that claims it, so every text has one intent.
    """
    groups: list[tuple[str, list[str]]] = []
    for source, original, rewrites in ALIGNED_SUITES:
        columns = [_lines(root / original)] + [_lines(root / r) for r in rewrites]
        if len({len(c) for c in columns}) != 1:
            raise ValueError(f"{source}: rewrite files are not line-aligned: {[len(c) for c in columns]}")
        groups.extend((source, list(row)) for row in zip(*columns, strict=True))
    groups.extend(("open-sora", [t]) for t in _open_sora(root))
    groups.extend(("fetv", [t]) for t in _fetv(root))

    by_original: dict[str, int] = {}
    claimed: set[str] = set()
    merged: list[tuple[str, list[str]]] = []
    for source, texts in groups:
        texts = [t for t in texts if t]
        if not texts:
            continue
        key = texts[0].lower()
        if key in by_original:
            target = merged[by_original[key]][1]
        else:
            by_original[key] = len(merged)
            merged.append((source, []))
            target = merged[-1][1]
        for t in texts:
            if t not in claimed:
                claimed.add(t)
                target.append(t)
    return [Intent(source, tuple(texts)) for source, texts in merged if texts]


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """p(rank r) = r**-s / H(n, s), r = 1..n."""
    if n < 1:
        raise ValueError("need at least one intent")
    weights = np.arange(1, n + 1, dtype=np.float64) ** -s
    return weights / weights.sum()


def sample_intents(intents: Sequence[Intent], n: int, seed: int) -> list[Intent]:
    """A seeded uniform subset of n intents (keeps the embedding bill bounded), in pool order."""
    if n >= len(intents):
        return list(intents)
    rng = np.random.default_rng([seed, 1])
    chosen = np.sort(rng.choice(len(intents), size=n, replace=False))
    return [intents[i] for i in chosen]


def build_trace(intents: Sequence[Intent], requests: int, warmup: int, zipf_s: float, seed: int,
                reshuffle_every: int = 0) -> Trace:
    """Draw `warmup + requests` requests: intent by Zipf(s) over a seeded popularity order, then a
    paraphrase uniformly. With `reshuffle_every`, the popularity order is drawn anew every that many
    requests (trends: what was hot goes cold at once), a trace on which the past misleads."""
    if requests < 0 or warmup < 0 or reshuffle_every < 0:
        raise ValueError("request counts must be non-negative")
    rng = np.random.default_rng([seed, 2])
    popularity = rng.permutation(len(intents))  # popularity[r] = intent at rank r + 1
    ranks = rng.choice(len(intents), size=warmup + requests, p=zipf_probabilities(len(intents), zipf_s))
    out = []
    for n, rank in enumerate(ranks):
        if reshuffle_every and n and n % reshuffle_every == 0:
            popularity = rng.permutation(len(intents))
        i = int(popularity[rank])
        p = int(rng.integers(len(intents[i].paraphrases)))
        out.append(Request(i, p, intents[i].paraphrases[p]))
    label = f"Zipf s = {zipf_s}, reshuffled every {reshuffle_every} requests" if reshuffle_every else ""
    return Trace(tuple(intents), tuple(out), warmup, zipf_s, seed, popularity=label)


def build_cold_trace(intents: Sequence[Intent], cached: int, new: int, seed: int) -> Trace:
    """Chai's protocol: `cached + new` distinct intents in a seeded order, each requested once in its
    original wording; the first `cached` requests are the warm-up."""
    if cached < 0 or new < 0:
        raise ValueError("request counts must be non-negative")
    if cached + new > len(intents):
        raise ValueError(f"{cached} + {new} distinct prompts asked of {len(intents)} intents")
    order = np.random.default_rng([seed, 3]).permutation(len(intents))[:cached + new]
    requests = tuple(Request(int(i), 0, intents[i].paraphrases[0]) for i in order)
    return Trace(tuple(intents), requests, cached, 0.0, seed,
                 popularity=f"cold: {cached} cached, then {new} new prompts, each once")


def describe(trace: Trace) -> dict[str, float]:
    """Counts that a report must state: requests, intents, paraphrases, distinct texts."""
    measured = trace.measured
    return {
        "intents_in_pool": len(trace.intents),
        "paraphrases_in_pool": sum(len(i.paraphrases) for i in trace.intents),
        "multi_paraphrase_intents": sum(len(i.paraphrases) > 1 for i in trace.intents),
        "warmup_requests": trace.warmup,
        "measured_requests": len(measured),
        "distinct_intents_requested": len({r.intent for r in trace.requests}),
        "distinct_texts_requested": len(trace.unique_texts()),
        "measured_repeats_of_earlier_text": _repeats(trace.requests, trace.warmup),
    }


def _repeats(requests: Iterable[Request], warmup: int) -> int:
    seen: set[str] = set()
    count = 0
    for i, r in enumerate(requests):
        if i >= warmup and r.text in seen:
            count += 1
        seen.add(r.text)
    return count
