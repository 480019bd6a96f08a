"""Cache modes of a diffusion worker: each is a row of configuration, never a separate code path.

| mode              | stores                                          | looks up                  | eviction |
|-------------------|-------------------------------------------------|---------------------------|----------|
| `none`            | nothing                                         | nothing (no cache)        | -        |
| `nirvana`         | latents at K = 10..50 % of N, fp16, raw bytes   | whole prompt              | lcbfu    |
| `flexcache`       | x0 + seed once, compressed (codec, 5 % budget)  | whole, then obj + bg      | utility  |
| `flexcache-whole` | as flexcache                                    | whole prompt only         | utility  |
| `flexcache-reseed`| as flexcache; x_K rebuilt with the request's noise | whole, then obj + bg      | utility  |
| `flexcache-fresh` | as flexcache, but only generations from scratch | whole, then obj + bg      | utility  |

`nirvana` is NIRVANA as the FlexCache paper compares against (five intermediate latents per
generation, K = 5, 10, 15, 20, 25 of 50 steps, top-1 whole-prompt lookup, LCBFU);
`flexcache-whole` is an ablation that separates what compression buys from what decoupling buys;
`flexcache-reseed` rebuilds hits with the request's own seed instead of the entry's (bench_rebuild.py
found that at least as good as NIRVANA-style's true latents on the reference model);
`flexcache-fresh` admits only misses, so no cached latent descends from another hit (a NIRVANA-style
cache gets that by construction: a hit at K = 25 computes no checkpoint to store).
Every mode admits every generation it runs (a hit at K stores what it computed: NIRVANA the
checkpoints after K, FlexCache its new x0), the way a serving fleet fills its cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexcache_model import codec

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
    rebuild_noise: str = "entry"  # x0 mode: rebuild x_K with the stored seed's noise, or the "request"'s
    admit: str = "all"  # "all" generations, or only "misses" (generated from scratch: no reuse chains)

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
         max_rel_error=codec.DEFAULT_MAX_REL_ERROR),
    Mode("flexcache-whole", store="x0", lookup="whole", eviction_policy="utility",
         max_rel_error=codec.DEFAULT_MAX_REL_ERROR),
    Mode("flexcache-reseed", store="x0", lookup="decoupled", eviction_policy="utility",
         max_rel_error=codec.DEFAULT_MAX_REL_ERROR, rebuild_noise="request"),
    Mode("flexcache-fresh", store="x0", lookup="decoupled", eviction_policy="utility",
         max_rel_error=codec.DEFAULT_MAX_REL_ERROR, admit="misses"),
)}
