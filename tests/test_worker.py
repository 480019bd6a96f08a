"""Diffusion workers with the client inside the sampling loop, against a real daemon (10-step runs)."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import torch

from flexcache_model.reference import world
from flexcache_model.reference.grounding import Grounder
from flexcache_model.reference.worker.fleet import run_fleet
from flexcache_model.reference.worker.modes import MODES
from flexcache_model.reference.worker.worker import DiffusionWorker, Job

STEPS = 10
PROMPT = "a small red square drifting left over blue stripes"


@pytest.fixture(scope="module")
def pipeline():
    torch.set_num_threads(1)
    from flexcache_model.reference.pipeline import load_pipeline

    return load_pipeline("flow")


def stats(worker: DiffusionWorker):
    worker.flush()  # stores run on the worker's background thread
    return worker.cache.stats()


def test_modes_are_configuration() -> None:
    assert MODES["nirvana"].checkpoint_steps(50) == [5, 10, 15, 20, 25]
    assert {m.eviction_policy for m in MODES.values()} == {None, "lcbfu", "utility"}
    assert MODES["flexcache"].admit_max_start == 0.1
    assert MODES["flexcache-admit-all"].admit_max_start == 1.0
    assert not MODES["none"].uses_cache and MODES["flexcache"].lookup == "decoupled"


def test_without_a_cache_every_step_runs(pipeline) -> None:
    worker = DiffusionWorker(pipeline, MODES["none"], None, steps=STEPS)
    out = worker.run(Job(0, PROMPT, seed=3))
    assert (out.kind, out.start_step, out.steps_run) == ("miss", 0, STEPS)
    torch.testing.assert_close(torch.from_numpy(out.x0), pipeline.sample(PROMPT, 3, STEPS))


def test_flexcache_stores_x0_once_and_a_repeat_starts_at_k(daemon, pipeline) -> None:
    worker = DiffusionWorker.connect(pipeline, MODES["flexcache-admit-all"], daemon.target, steps=STEPS, timeout_s=10.0)
    try:
        first = worker.run(Job(0, PROMPT, seed=1))
        s = stats(worker)
        assert first.kind == "miss" and s.entries == 1
        assert s.blob_bytes < first.x0.nbytes / 2  # compressed by the codec before it left the worker
        again = worker.run(Job(1, PROMPT, seed=2))
        assert (again.kind, again.start_step, again.steps_run) == ("full", STEPS // 2, STEPS // 2)
        assert again.sources and again.similarity == pytest.approx(1.0, abs=1e-5)
        scratch = pipeline.sample(PROMPT, 2, STEPS)
        assert not np.allclose(again.x0, scratch.numpy())  # it really started from the cached latent
        assert stats(worker).entries == 2  # admit-all: the hit's generation is stored too
    finally:
        worker.close()


def test_flexcache_admits_only_generations_that_ran_most_steps_and_rebuilds_with_the_request_noise(
        daemon, pipeline) -> None:
    worker = DiffusionWorker.connect(pipeline, MODES["flexcache"], daemon.target, steps=STEPS, timeout_s=10.0)
    try:
        assert worker.run(Job(0, PROMPT, seed=1)).kind == "miss" and stats(worker).entries == 1
        again = worker.run(Job(1, PROMPT, seed=2))
        assert again.kind == "full" and stats(worker).entries == 1
        vector = pipeline.embed([PROMPT])[0]
        start = worker.cache.get(vector, rebuild=worker.rebuild, noise_seed=2)
        expected = pipeline.sample(PROMPT, 2, STEPS, start_latent=torch.from_numpy(start.latent),
                                   start_step=start.steps)
        torch.testing.assert_close(torch.from_numpy(again.x0), expected)
    finally:
        worker.close()


def test_nirvana_stores_five_checkpoints_and_serves_the_largest(daemon, pipeline) -> None:
    worker = DiffusionWorker.connect(pipeline, MODES["nirvana"], daemon.target, steps=STEPS, timeout_s=10.0)
    try:
        worker.run(Job(0, PROMPT, seed=1))
        s = stats(worker)
        assert s.entries == 5 and s.blob_bytes == 5 * int(np.prod(pipeline.latent_shape)) * 2  # raw fp16
        again = worker.run(Job(1, PROMPT, seed=2))
        assert (again.kind, again.start_step) == ("full", 5)  # K = 5 of 10, the largest checkpoint
        assert stats(worker).entries == 5  # a hit at K = 5 computed no checkpoint after it
    finally:
        worker.close()


def test_shadow_samples_score_a_hit_against_scratch_and_report_it_to_the_guard(start_daemon, pipeline) -> None:
    from flexcache.client.shadow import Shadow
    from flexcache_model.reference.calibration import ProbeScorer

    daemon = start_daemon(guard_max_loss=1.0)
    scorer = ProbeScorer()
    worker = DiffusionWorker.connect(pipeline, MODES["flexcache"], daemon.target, steps=STEPS, shadow=Shadow(1.0),
                                     timeout_s=10.0,
                                     scorer=scorer)
    try:
        first = worker.run(Job(0, PROMPT, seed=1))
        assert first.kind == "miss" and first.shadow_loss is None  # only hits have shadows
        stats(worker)
        hit = worker.run(Job(1, PROMPT, seed=2))
        assert hit.kind == "full" and hit.shadow_loss is not None and hit.shadow_s > 0
        video = pipeline.decode(torch.from_numpy(hit.x0)).numpy()
        scratch = pipeline.decode(pipeline.sample(PROMPT, 2, STEPS)).numpy()
        expected = scorer.score_batch([PROMPT] * 2, np.stack([scratch, video]))
        assert hit.shadow_loss == pytest.approx(expected[0] - expected[1], abs=1e-6)
        worker.flush()  # the report goes out on the store thread
        (fig,) = worker.cache.step_tables().bins
        assert (fig.table, fig.granted_steps, fig.samples) == ("whole", hit.start_step, 1)
        assert fig.mean_loss == pytest.approx(hit.shadow_loss, abs=1e-4)
    finally:
        worker.close()
    with pytest.raises(ValueError, match="scorer"):
        DiffusionWorker(pipeline, MODES["none"], None, shadow=Shadow(0.5))


def test_a_dead_daemon_is_a_miss_and_the_worker_keeps_serving(pipeline, caplog) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    worker = DiffusionWorker.connect(pipeline, MODES["flexcache"], target, steps=STEPS)
    try:
        with caplog.at_level(logging.WARNING, logger="flexcache.client"):
            outs = [worker.run(Job(i, PROMPT, seed=i)) for i in range(2)]
            worker.flush()
        assert [(o.kind, o.steps_run) for o in outs] == [("miss", STEPS)] * 2
        assert "treated as a miss" in caplog.text
    finally:
        worker.close()


def test_fleet_runs_a_trace_through_worker_processes(daemon) -> None:
    prompts = [PROMPT, "a large green circle bouncing on a yellow checkerboard"]
    jobs = [Job(i, prompts[i % 2], seed=100 + i) for i in range(8)]
    run = run_fleet("flexcache", daemon.target, jobs, warmup=2, workers=2, steps=STEPS, progress=False,
                    timeout_s=10.0)  # two torch processes fill both cores: a 1 s lookup deadline could miss
    assert [o.index for o in run.warmup] == [0, 1] and [o.index for o in run.measured] == list(range(2, 8))
    assert run.measured_wall_s > 0 and run.workers == 2
    assert [o.kind for o in run.measured] == ["full"] * 6  # the warm-up stored both prompts before the clock
    with pytest.raises(ValueError, match="unknown mode"):
        run_fleet("memcached", daemon.target, jobs, warmup=0)


def test_grounding_is_deterministic_and_keeps_colours() -> None:
    grounder = Grounder()
    spec = grounder.spec("a red stop sign in a still frame")
    assert spec == Grounder().spec("a red stop sign in a still frame")
    assert len(spec.objects) == 1 and spec.objects[0].color == "red"
    for prompt in ("a dog running on the beach at sunset", "A tranquil tableau of bedroom", "green stripes"):
        s = grounder.spec(prompt)
        assert s.objects[0].color != s.bg_color and None not in (s.objects[0].shape, s.objects[0].motion)
        for variant in range(4):  # every wording says the same clip (the size word is sometimes left out)
            parsed = world.parse_caption(Grounder.caption(s, variant))
            assert parsed.bg_type == s.bg_type and parsed.bg_color == s.bg_color
            o, p = s.objects[0], parsed.objects[0]
            assert (p.shape, p.color, p.motion) == (o.shape, o.color, o.motion) and p.size in (o.size, None)
