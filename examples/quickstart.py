"""The README's client quickstart, runnable: a miss generated with all N steps and stored, then a
paraphrase of it served from the cache, resumed at step K so that only N - K steps run.

    make serve                                  # in one terminal: the daemon on 127.0.0.1:50051
    .venv/bin/python examples/quickstart.py     # in another (--target HOST:PORT for another daemon)

The video model is the repository's reference text-to-video model (flexcache_model.reference, CPU),
prompts are embedded with the offline MiniLM (flexcache_model.text.embed), and the cache calls are
the ones the serving worker makes (flexcache_model/reference/worker/worker.py). Each run stores into
a namespace of its own (the process id is in the model name), so a rerun against the same daemon
starts with a miss again. The marked region is copied verbatim into the README (tests/test_examples.py
keeps the two equal).

Exit status 0 when the first request missed and the second was a whole-prompt hit; 1 otherwise (an
unreachable daemon is a miss for the client, so the second request misses too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

from flexcache.client import CacheClient, Hit
from flexcache.client.prompt_split import split_prompt
from flexcache_model.reference.pipeline import load_pipeline
from flexcache_model.reference.rebuild import rebuild_for
from flexcache_model.reference.worker.worker import namespace_for
from flexcache_model.text import embed

STEPS = 50  # N: the reference model's default (about 0.3 s a clip on CPU)
FIRST = "a small red square moving left over a plain blue background"
SECOND = "a small red square sliding to the left on a uniform blue background"  # a paraphrase of FIRST


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="the daemon's gRPC address (HOST:PORT)")
    args = parser.parse_args(argv)
    target = args.target

    # --- quickstart begin ---
    pipeline = load_pipeline("flow")                  # the reference model: VAE + DiT denoiser + flow scheduler
    ns = replace(namespace_for(pipeline, STEPS), tenant="example", model=f"reference-flow-{os.getpid()}")
    cache = CacheClient(target, namespace=ns, timeout_s=1.0)   # codec budget 5e-2 by default
    rebuild = rebuild_for(pipeline)                   # (x0, seed, k, N) -> the latent at step k

    def serve(prompt: str, seed: int) -> tuple[Hit | None, float]:
        """One request: returns the hit (None for a miss) and the seconds from lookup to decoded video."""
        parts = split_prompt(prompt)                  # object part / background part ("" when absent)
        texts = [prompt] + [t for t in (parts.object, parts.background) if t]
        vectors = dict(zip(texts, embed(texts), strict=True))
        v, v_obj, v_bg = vectors[prompt], vectors.get(parts.object), vectors.get(parts.background)
        t0 = time.perf_counter()
        hit = cache.get(v, object_vector=v_obj, background_vector=v_bg, rebuild=rebuild, noise_seed=seed,
                        as_torch=True)
        t1 = time.perf_counter()
        if hit is not None:                           # hit.kind: "full", "composed" (or "partial")
            x0 = pipeline.sample(v, seed, STEPS, start_latent=hit.latent, start_step=hit.steps)  # N - K steps
        else:
            x0 = pipeline.sample(v, seed, STEPS)      # all N steps
        t2 = time.perf_counter()
        pipeline.decode(x0)                           # the video, [frames, 3, height, width]
        seconds = time.perf_counter() - t0
        if hit is None:                               # store once: the clean latent and its seed
            cache.put(prompt, x0, v, object_vector=v_obj, background_vector=v_bg, seed=seed,
                      step_seconds=(t2 - t1) / STEPS)
        return hit, seconds

    first, first_s = serve(FIRST, seed=1)
    second, second_s = serve(SECOND, seed=2)
    # --- quickstart end ---
    cache.close()

    print(f"namespace: {ns.tenant}/{ns.model}, {STEPS} steps, daemon {target}")
    if first is None:
        print(f"first request:  miss, {STEPS} of {STEPS} steps in {first_s:.2f} s, stored: '{FIRST}'")
    else:
        print(f"first request:  {first.kind} hit at K = {first.steps}: expected a miss in a new namespace")
        return 1
    if second is None or second.kind != "full":
        kind = "miss" if second is None else f"{second.kind} hit"
        print(f"second request: {kind}, expected a full hit: is the daemon at {target} running "
              "with its default skip thresholds?")
        return 1
    source = second.sources[0]
    print(f"second request: full hit at K = {second.steps} (similarity {source.similarity:.3f} to '{source.prompt}'), "
          f"{STEPS - second.steps} of {STEPS} steps in {second_s:.2f} s: '{SECOND}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
