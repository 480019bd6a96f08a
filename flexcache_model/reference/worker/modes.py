"""Cache modes of a diffusion worker: each is a row of configuration, never a separate code path.

| mode                  | stores                                         | looks up             | eviction |
|-----------------------|------------------------------------------------|----------------------|----------|
| `none`                | nothing                                        | nothing (no cache)   | -        |
| `nirvana`             | latents at K = 10..50 % of N, fp16, raw bytes  | whole prompt         | lcbfu    |
| `flexcache`           | x0 + seed once, compressed (codec, 5 % budget) | whole, then obj + bg | utility  |
| `flexcache-whole`     | as flexcache                                   | whole prompt only    | utility  |
| `flexcache-admit-all` | as flexcache, also generations from deep hits  | whole, then obj + bg | utility  |
| `flexcache-uncapped`  | as flexcache                                   | as flexcache, composed K uncapped | utility |

`nirvana` is NIRVANA as the FlexCache paper compares against (five intermediate latents per
generation, K = 5, 10, 15, 20, 25 of 50 steps, top-1 whole-prompt lookup, LCBFU). It stores every
generation it runs: a hit at K stores the checkpoints after K (NIRVANA's own rule), so a hit at
K = 25 stores nothing.

`flexcache` rebuilds a hit's x_K with the request's own noise, which bench/bench_rebuild.py compared
with the entry's own noise and with NIRVANA-style's true latents on the reference model (measured in
docs/bench_rebuild_paraphrase.md and docs/bench_rebuild_changed.md), and admits only generations
that ran at least 90 % of their steps: from scratch, or from a hit at K <= 5 of 50 (every composed
hit, under the daemon's cap). Admitting everything lets a latent served from a deep hit be cached
and served again, drifting further from its prompt each time (reuse chains: the
`flexcache-admit-all` ablation measures it); a NIRVANA-style cache is spared that because the
checkpoints a hit computes lie after its own K. Admitting only misses starved the cache instead: a
request served by a shallow composed hit was never stored, so its repeats could not hit it whole,
and decoupled lookup cost throughput instead of adding it (measured in docs/decisions.md).
`flexcache-whole` separates what compression buys from what decoupled lookup buys. Composed hits
skip at most 10 % of the steps (the daemon's `composed_max_fraction`; docs/bench_composed.md);
`flexcache-uncapped` lets them skip what the steps table grants the weaker part.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexcache.client import codec

__all__ = ["MODES", "Mode"]


@dataclass(frozen=True)
class Mode:
    name: str
    store: str  # "none", "trajectory" (intermediate latents at `checkpoints`) or "x0" (clean latent + seed)
    lookup: str  # "none", "whole" or "decoupled"
    eviction_policy: str | None  # the daemon's --eviction-policy for this mode
    max_rel_error: float | None = None  # the client's codec error budget; None sends raw bytes
    store_dtype: str = "float32"  # dtype latents are stored in (before any codec)
    checkpoints: tuple[float, ...] = ()  # trajectory mode: fractions of N whose latents are stored
    admit_max_start: float = 1.0  # store generations that started at K <= this fraction of N (1: all)
    composed_max_fraction: float | None = None  # the daemon's cap on a composed hit's K (None: its default)

    @property
    def uses_cache(self) -> bool:
        return self.lookup != "none"

    def checkpoint_steps(self, total_steps: int) -> list[int]:
        return sorted({round(f * total_steps) for f in self.checkpoints} - {0})


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("none", store="none", lookup="none", eviction_policy=None),
    Mode("nirvana", store="trajectory", lookup="whole", eviction_policy="lcbfu", store_dtype="float16",
         checkpoints=(0.1, 0.2, 0.3, 0.4, 0.5)),
    Mode("flexcache", store="x0", lookup="decoupled", eviction_policy="utility",
         max_rel_error=codec.DEFAULT_MAX_REL_ERROR, admit_max_start=0.1),
    Mode("flexcache-whole", store="x0", lookup="whole", eviction_policy="utility",
         max_rel_error=codec.DEFAULT_MAX_REL_ERROR, admit_max_start=0.1),
    Mode("flexcache-admit-all", store="x0", lookup="decoupled", eviction_policy="utility",
         max_rel_error=codec.DEFAULT_MAX_REL_ERROR),
    Mode("flexcache-uncapped", store="x0", lookup="decoupled", eviction_policy="utility",
         max_rel_error=codec.DEFAULT_MAX_REL_ERROR, admit_max_start=0.1, composed_max_fraction=1.0),
)}
