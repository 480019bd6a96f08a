"""A composed hit, runnable: the object of one cached video over the background of another.

    make serve                                  # in one terminal: the daemon on 127.0.0.1:50051
    .venv/bin/python examples/composed.py       # in another (--target HOST:PORT for another daemon)

Two generations are stored, each with its prompt's object and background vectors and an object mask
on the latent grid (what makes an entry usable as a donor): one object over one scene, another
object over another scene. Then the first object is requested over the second scene. As a whole
that prompt is too far from both entries for the daemon's default skip thresholds (a miss), but its
object part matches the first entry's and its background part the second's, so the daemon answers
with two donors and the client composes their latents (client/compose.py): `hit.kind == "composed"`,
granted at most `composed_max_fraction` of the steps (K = 5 of 50 by default). The prompts come from
the reference model's vocabulary (flexcache_model/reference/world.py).

Each run stores into a namespace of its own (the process id is in the model name), so reruns against
the same daemon start empty. Exit status 0 when the request was served by a composed hit, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

import numpy as np

from flexcache.client import CacheClient, Hit
from flexcache.client.masks import estimate_object_mask
from flexcache.client.prompt_split import split_prompt
from flexcache_model.reference.pipeline import Pipeline, load_pipeline
from flexcache_model.reference.rebuild import rebuild_for
from flexcache_model.reference.worker.worker import namespace_for
from flexcache_model.text import embed

STEPS = 50  # N: the reference model's default
OBJECT_DONOR = "a purple square rising over a red checkerboard"
BACKGROUND_DONOR = "a white cross drifting right over a night sky with stars"
REQUEST = "a purple square rising over a night sky with stars"  # OBJECT_DONOR's object, BACKGROUND_DONOR's scene


def vectors(prompt: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The prompt's vector and its object and background parts' (None for a part the prompt lacks),
    as the serving worker embeds them."""
    parts = split_prompt(prompt)
    texts = [prompt] + [t for t in (parts.object, parts.background) if t]
    table = dict(zip(texts, embed(texts), strict=True))
    return table[prompt], table.get(parts.object), table.get(parts.background)


def generate_and_store(pipeline: Pipeline, cache: CacheClient, prompt: str, seed: int) -> float:
    """Sample all N steps from the seed's noise and store x0 with its seed, vectors and object mask;
    returns the sampling seconds."""
    v, v_obj, v_bg = vectors(prompt)
    t0 = time.perf_counter()
    x0 = pipeline.sample(v, seed, STEPS)
    seconds = time.perf_counter() - t0
    mask = estimate_object_mask(x0.numpy())  # bool [T, H, W] on the latent grid; a segmenter's would do too
    entry = cache.put(prompt, x0, v, object_vector=v_obj, background_vector=v_bg, object_mask=mask, seed=seed,
                      step_seconds=seconds / STEPS)
    if entry is None:
        raise SystemExit(f"storing '{prompt}' failed: is the daemon at {cache.target} running?")
    return seconds


def serve(pipeline: Pipeline, cache: CacheClient, prompt: str, seed: int) -> tuple[Hit | None, float]:
    """Look up the prompt (whole, then object + background) and sample the remaining N - K steps;
    returns the hit (None for a miss) and the seconds from lookup to decoded video."""
    v, v_obj, v_bg = vectors(prompt)
    t0 = time.perf_counter()
    hit = cache.get(v, object_vector=v_obj, background_vector=v_bg, rebuild=rebuild_for(pipeline), noise_seed=seed,
                    as_torch=True)
    if hit is None:
        x0 = pipeline.sample(v, seed, STEPS)
    else:
        x0 = pipeline.sample(v, seed, STEPS, start_latent=hit.latent, start_step=hit.steps)
    pipeline.decode(x0)
    return hit, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="the daemon's gRPC address (HOST:PORT)")
    args = parser.parse_args(argv)

    pipeline = load_pipeline("flow")
    ns = replace(namespace_for(pipeline, STEPS), tenant="example", model=f"reference-flow-{os.getpid()}")
    print(f"namespace: {ns.tenant}/{ns.model}, {STEPS} steps, daemon {args.target}")
    with CacheClient(args.target, namespace=ns, timeout_s=1.0) as cache:
        for seed, prompt in enumerate((OBJECT_DONOR, BACKGROUND_DONOR), start=1):
            seconds = generate_and_store(pipeline, cache, prompt, seed)
            print(f"stored: '{prompt}' ({STEPS} steps in {seconds:.2f} s)")
        hit, seconds = serve(pipeline, cache, REQUEST, seed=3)

    if hit is None or hit.kind != "composed":
        kind = "a miss" if hit is None else f"a {hit.kind} hit"
        print(f"request: '{REQUEST}' got {kind}, expected a composed hit: is the daemon at {args.target} "
              "running with its default skip thresholds and composed hits on (composed_max_fraction > 0)?")
        return 1
    obj, bg = hit.sources
    print(f"request: '{REQUEST}'")
    print(f"composed hit at K = {hit.steps}: {STEPS - hit.steps} of {STEPS} steps in {seconds:.2f} s")
    print(f"  object from:     '{obj.prompt}' (object similarity {obj.similarity:.3f})")
    print(f"  background from: '{bg.prompt}' (background similarity {bg.similarity:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
