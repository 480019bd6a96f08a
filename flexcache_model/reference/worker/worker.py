"""A diffusion worker with the cache shim inside its sampling loop.

For each request: embed the prompt (and, for decoupled lookup, its object and background parts),
ask the cache for a starting latent, run the remaining N-K denoising steps of the reference model,
decode the video, and hand what the mode keeps to a background thread that stores it. Without a
cache (mode `none`, or a daemon that is down or slow) the same loop runs all N steps: the client
turns every cache failure into a miss.

Stores are off the request's path, as a serving worker would do them: the caller gets its video
when decoding ends. At most `store_backlog` generations wait to be stored; beyond that a new one is
dropped with a warning (the cache is an accelerator, never back-pressure on serving).

With a `Shadow` and a scorer, a fraction of hits is also generated from scratch (same prompt, same
seed) after the request's own video is done, both videos are scored and the paired loss is reported
to the daemon's quality guard on the store thread (client/shadow.py). The shadow's time is counted
apart (`Outcome.shadow_s`), since a serving fleet would spend it; the request's latency excludes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flexcache.client import CacheClient, Namespace
from flexcache.client.base import Hit
from flexcache.client.prompt_split import split_prompt
from flexcache.client.shadow import Shadow, quality_sample
from flexcache.client.stores import BackgroundStores
from flexcache_model.reference.pipeline import Pipeline
from flexcache_model.reference.rebuild import rebuild_for

from .modes import Mode

__all__ = ["DiffusionWorker", "Job", "Outcome", "namespace_for", "store_generation"]

log = logging.getLogger("flexcache_model.reference.worker")


@dataclass(frozen=True)
class Job:
    index: int  # position in the trace
    prompt: str
    seed: int


@dataclass
class Outcome:
    index: int
    kind: str  # "miss", "full" (whole-prompt hit) or "composed" (object + background donors)
    start_step: int  # K: the step sampling started from
    steps_run: int  # N - K
    latency_s: float  # embed + lookup + fetch + sampling + decode (storing runs in the background)
    lookup_s: float  # embed + lookup + fetch + rebuild/compose
    sample_s: float
    decode_s: float
    x0: np.ndarray = field(repr=False)  # the generated clean latent, float32
    sources: tuple[str, ...] = ()  # entry ids the start latent came from
    similarity: float = 0.0  # of the whole-prompt match or the object donor
    shadow_s: float = 0.0  # the shadow sample's generation and scoring, when this hit had one
    shadow_loss: float | None = None  # its paired loss (score from scratch minus score of the served video)


def namespace_for(pipeline: Pipeline, steps: int) -> Namespace:
    """The cache namespace of the reference model: latents of other settings never mix."""
    _, t, h, w = pipeline.latent_shape
    return Namespace(tenant="reference", model=f"flexcache-reference-{pipeline.schedule}", width=w, height=h,
                     frames=t, scheduler=pipeline.schedule, total_steps=steps)


class DiffusionWorker:
    """Serves one request at a time; `cache` is None in mode `none`."""

    def __init__(self, pipeline: Pipeline, mode: Mode, cache: CacheClient | None, steps: int = 50,
                 store_backlog: int = 8, shadow: Shadow | None = None, scorer: Any = None) -> None:
        if mode.uses_cache and cache is None:
            raise ValueError(f"mode {mode.name} needs a CacheClient")
        self.pipeline = pipeline
        self.mode = mode
        self.cache = cache if mode.uses_cache else None
        self.steps = steps
        self.rebuild = rebuild_for(pipeline)
        self._storer = BackgroundStores(store_backlog) if self.cache is not None else None
        if shadow is not None and scorer is None:
            raise ValueError("shadow samples need a scorer")
        self.shadow, self.scorer = shadow, scorer

    @classmethod
    def connect(cls, pipeline: Pipeline, mode: Mode, target: str | None, steps: int = 50,
                shadow: Shadow | None = None, scorer: Any = None, *, timeout_s: float = 1.0) -> DiffusionWorker:
        """A worker with a client for `target` configured as the mode says (no client for `none`);
        `timeout_s`: the client's deadline of each call but the blob transfers (CacheClient's), past which
        the call is a miss."""
        cache = None
        if mode.uses_cache:
            if not target:
                raise ValueError(f"mode {mode.name} needs a daemon address")
            cache = CacheClient(target, namespace_for(pipeline, steps), max_rel_error=mode.max_rel_error,
                                timeout_s=timeout_s)
        return cls(pipeline, mode, cache, steps, shadow=shadow, scorer=scorer)

    def flush(self) -> None:
        """Wait until every generation handed to the store thread is stored (or failed)."""
        if self._storer is not None:
            self._storer.flush()

    def close(self) -> None:
        if self._storer is not None:
            self._storer.close()
            self._storer = None
        if self.cache is not None:
            self.cache.close()

    def run(self, job: Job) -> Outcome:
        t0 = time.perf_counter()
        vector, parts = self._embed(job.prompt)
        start, start_step, kind, sources, similarity, hit = None, 0, "miss", (), 0.0, None
        if self.cache is not None:
            # x_K is rebuilt with the request's own noise (modes.py says why), not the entry's stored seed
            hit = self.cache.get(vector, object_vector=parts[0], background_vector=parts[1], rebuild=self.rebuild,
                                 noise_seed=job.seed)
            if hit is not None:
                start = torch.from_numpy(np.asarray(hit.latent, dtype=np.float32))
                start_step, kind = hit.steps, hit.kind
                sources = tuple(c.entry_id for c in hit.sources)
                similarity = hit.sources[0].similarity
        t1 = time.perf_counter()
        keep_trajectory = self.mode.store == "trajectory"
        result = self.pipeline.sample(vector, job.seed, self.steps, start_latent=start, start_step=start_step,
                                      return_trajectory=keep_trajectory)
        x0, trajectory = result if keep_trajectory else (result, None)
        t2 = time.perf_counter()
        video = self.pipeline.decode(x0)  # the video a serving worker returns to its caller
        t3 = time.perf_counter()
        steps_run = self.steps - start_step
        if self._storer is not None and start_step <= self.mode.admit_max_start * self.steps:
            step_seconds = (t2 - t1) / max(steps_run, 1)
            cache, mode, steps = self.cache, self.mode, self.steps
            self._storer.submit(lambda: store_generation(cache, mode, job.prompt, job.seed, x0, trajectory, vector,
                                                         parts, start_step, steps, step_seconds))
        outcome = Outcome(job.index, kind, start_step, steps_run, t3 - t0, t1 - t0, t2 - t1, t3 - t2,
                          x0.numpy().astype(np.float32), sources, similarity)
        if self.shadow is not None and self.shadow.wants(hit):
            assert hit is not None
            self._shadow(job, vector, video, hit, outcome)
        return outcome

    def _shadow(self, job: Job, vector: np.ndarray, video: torch.Tensor, hit: Hit, outcome: Outcome) -> None:
        """Generate the request from scratch too, score both and report the loss (module docstring)."""
        t0 = time.perf_counter()
        scratch = self.pipeline.decode(self.pipeline.sample(vector, job.seed, self.steps))
        scores = self.scorer.score_batch([job.prompt] * 2, torch.stack([scratch, video]).numpy())
        outcome.shadow_loss = float(scores[0] - scores[1])
        outcome.shadow_s = time.perf_counter() - t0
        if self._storer is not None:
            cache, sample = self.cache, quality_sample(hit, outcome.shadow_loss)
            self._storer.submit(lambda: cache.report_quality([sample]))

    def _embed(self, prompt: str) -> tuple[np.ndarray, tuple[np.ndarray | None, np.ndarray | None]]:
        """The prompt's vector (also the denoiser's conditioning) and, for decoupled lookup, its parts'."""
        if self.mode.lookup != "decoupled":
            return self.pipeline.embed([prompt])[0], (None, None)
        split = split_prompt(prompt)
        texts = [prompt] + [t for t in (split.object, split.background) if t]
        vectors = dict(zip(texts, self.pipeline.embed(texts), strict=True))
        return vectors[prompt], (vectors.get(split.object), vectors.get(split.background))


def store_generation(cache: CacheClient, mode: Mode, prompt: str, seed: int, x0: torch.Tensor,
                     trajectory: list[torch.Tensor | None] | None, vector: np.ndarray,
                     parts: tuple[np.ndarray | None, np.ndarray | None], start_step: int, steps: int,
                     step_seconds: float) -> None:
    """Store what `mode` keeps of one generation that started at `start_step`: x0 and its seed once
    (store-once modes), or the trajectory's latents at the mode's checkpoints after `start_step`."""
    dtype = np.dtype(mode.store_dtype)
    if mode.store == "x0":
        cache.put(prompt, x0.numpy().astype(dtype), vector, object_vector=parts[0], background_vector=parts[1],
                  seed=seed, step_seconds=step_seconds)
    elif mode.store == "trajectory":
        assert trajectory is not None
        for k in mode.checkpoint_steps(steps):
            if k > start_step:  # the latents before K were never computed by this generation
                cache.put(prompt, trajectory[k].numpy().astype(dtype), vector, step=k, step_seconds=step_seconds)
