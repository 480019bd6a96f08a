"""One surface, two backends: a CacheClient talking to a real daemon and a LocalCache over the same
cache core in this process answer every call alike (qdrant-client's congruence tests, for FlexCache).

The same scripted and seeded-random sequences of operations run against both, each backend on its
own data folder with the same settings, and every answer is compared: entry ids, candidates (the
similarity within 1e-4), granted steps, kinds of hit, latents bit-exact (max_rel_error=0), stats,
and None in the same places, with the same reason (the status code, or the client's own error).
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flexcache.client import CacheBase, Candidate, Fetched, Hit, LocalCache, LookupResult, QualitySample, StepTables
from flexcache.v1 import cache_pb2 as pb
from tests.conftest import NS, connect
from tests.vectors import DIM, at_similarity, unit

SETTINGS = {
    "defaults": {},
    "uncapped composites, lru, small budget": {"composed_max_fraction": "1.0", "eviction_policy": "lru",
                                               "max_bytes": "40KiB"},
}
GRID = (3, 4, 4)
BAD_ID = "0" * 64


@pytest.fixture(params=list(SETTINGS))
def pair(request, start_daemon, tmp_path: Path) -> Iterator[tuple[CacheBase, CacheBase]]:
    """(a CacheClient of a real daemon, a LocalCache), with the same settings and fresh data folders."""
    settings = SETTINGS[request.param]
    daemon = start_daemon(**settings)
    with connect(daemon.target, warn_every_s=0) as remote, \
            LocalCache(tmp_path / "local", NS, settings=settings, max_rel_error=0.0, timeout_s=5.0,
                       warn_every_s=0) as local:
        yield remote, local


# ---- answers, in a form both backends can be compared in ----
def normal(value: Any) -> Any:
    if isinstance(value, LookupResult):
        return ("lookup", value.miss_reason, [normal(c) for c in value.candidates])
    if isinstance(value, Candidate):
        mask = None if value.object_mask is None else (value.object_mask.shape, value.object_mask.tobytes())
        return ("candidate", value.entry_id, value.similarity, value.granted_steps, value.role, value.prompt,
                value.blob.SerializeToString(deterministic=True), mask)
    if isinstance(value, Fetched):
        return ("fetched", value.entry_id, value.prompt, value.blob.SerializeToString(deterministic=True),
                bytes(value.data))
    if isinstance(value, Hit):
        latent = np.asarray(value.latent)
        return ("hit", value.kind, value.steps, [c.entry_id for c in value.sources], latent.dtype.name,
                latent.shape, latent.tobytes())
    if isinstance(value, pb.StatsResponse):
        same = pb.StatsResponse()
        same.CopyFrom(value)
        for machine_fact in ("disk_bytes", "disk_free_bytes"):  # two folders' files, not the cache's answer
            same.ClearField(machine_fact)
        return ("stats", same.SerializeToString(deterministic=True))
    return value


def assert_same(remote: Any, local: Any, where: str) -> None:
    if isinstance(remote, float) and isinstance(local, float):
        assert abs(remote - local) <= 1e-4, f"{where}: similarity {remote} vs {local}"
    elif isinstance(remote, tuple | list) and isinstance(local, tuple | list) and len(remote) == len(local):
        for i, (r, lo) in enumerate(zip(remote, local, strict=True)):
            assert_same(r, lo, f"{where}[{i}]")
    else:
        assert remote == local, f"{where}: {str(remote)[:300]} vs {str(local)[:300]}"


def reason(cache: CacheBase) -> str | None:
    """Why the last call failed: a status code's name, or the type of the client's own error."""
    error = cache.last_error
    if error is None:
        return None
    code = getattr(error, "code", None)
    return code().name if callable(code) else type(error).__name__


Op = Callable[[CacheBase], Any]


def run(pair: tuple[CacheBase, CacheBase], ops: list[tuple[str, Op]]) -> list[Any]:
    """Each operation on both backends in turn; their answers (and failures) must agree."""
    answers = []
    for i, (name, op) in enumerate(ops):
        results = []
        for cache in pair:
            cache.last_error = None
            results.append((normal(op(cache)), reason(cache)))
        (remote, remote_reason), (local, local_reason) = results
        assert_same(remote, local, f"op {i} {name}")
        assert remote_reason == local_reason, f"op {i} {name}: failed with {remote_reason} vs {local_reason}"
        answers.append(remote)
    return answers


def latent(seed: int, dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((4, *GRID)).astype(dtype)


def box_mask(top: int, left: int) -> np.ndarray:
    mask = np.zeros(GRID, bool)
    mask[:, top:top + 2, left:left + 2] = True
    return mask


def rebuild(x0: np.ndarray, seed: int, k: int, total_steps: int) -> np.ndarray:
    eps = np.random.default_rng(seed).standard_normal(np.shape(x0)).astype(np.float32)
    sigma = 1 - k / total_steps
    return (1 - sigma) * np.asarray(x0, np.float32) + sigma * eps


def put(prompt: str, x: np.ndarray, vector: np.ndarray, **kwargs: Any) -> tuple[str, Op]:
    return f"put {prompt[:40]!r}", lambda c: c.put(prompt, x, vector, **kwargs)


def scripted() -> list[tuple[str, Op]]:
    dog, forest, cat, beach = unit(1), unit(2), unit(3), unit(4)
    a, b, c_ = unit(10), unit(11), unit(12)
    ids: dict[str, str] = {}

    def stored(key: str, op: Op) -> Op:
        def call(cache: CacheBase) -> Any:
            entry = op(cache)
            ids.setdefault(key, entry)
            return entry
        return call

    def by_id(key: str, method: str, **kwargs: Any) -> Op:
        return lambda cache: getattr(cache, method)(ids.get(key, BAD_ID), **kwargs)

    ops: list[tuple[str, Op]] = [
        ("stats, empty", lambda c: c.stats()),
        ("lookup, unknown namespace", lambda c: c.lookup(a)),
        ("put a", stored("a", lambda c: c.put("a corgi on a beach", latent(1), a, seed=11))),
        ("put a again", lambda c: c.put("a corgi on a beach", latent(1), a, seed=11)),
        ("put b with parts and a mask", stored("b", lambda c: c.put(
            "a dog in a forest", latent(2), b, object_vector=dog, background_vector=forest, object_mask=box_mask(1, 1),
            seed=22))),
        ("put c with parts, mask estimated", stored("c", lambda c: c.put(
            "a cat on a beach", latent(3), c_, object_vector=cat, background_vector=beach, seed=33))),
        ("put a NIRVANA row at step 20", stored("row", lambda c: c.put("a row", latent(4), unit(13), step=20))),
        ("put float16, no seed", stored("f16", lambda c: c.put("half", latent(5, "float16"), unit(14)))),
        ("put int32 raw", stored("i32", lambda c: c.put("ints", np.arange(64, dtype=np.int32).reshape(4, 16),
                                                        unit(15)))),
        put("step_seconds set", latent(6), unit(16), step_seconds=2.5, attrs={"origin": "test"}),
    ]
    for similarity in (0.999, 0.96, 0.93, 0.87, 0.80, 0.70, 0.5):
        ops.append((f"lookup a at {similarity}", lambda c, s=similarity: c.lookup(at_similarity(a, s, 5), top_k=3)))
    ops += [
        ("lookup row at 0.87 (allows 15 < 20)", lambda c: c.lookup(at_similarity(unit(13), 0.87, 6))),
        ("lookup row", lambda c: c.lookup(unit(13))),
        ("lookup composite", lambda c: c.lookup(unit(20), object_vector=at_similarity(dog, 0.93, 7),
                                                background_vector=at_similarity(beach, 0.97, 8), top_k=2)),
        ("lookup partial object", lambda c: c.lookup(unit(20), object_vector=dog, background_vector=unit(21),
                                                     partial_roles=("object",))),
        ("lookup partial background only", lambda c: c.lookup(unit(20), background_vector=forest,
                                                              partial_roles=("object", "background"))),
        ("lookup parts that miss", lambda c: c.lookup(unit(20), object_vector=unit(22), background_vector=unit(23))),
        ("fetch a, credited", by_id("a", "fetch", granted_steps=25)),
        ("fetch b as an object donor", by_id("b", "fetch", role="object", granted_steps=5)),
        ("fetch the row", by_id("row", "fetch")),
        ("fetch int32", by_id("i32", "fetch")),
        ("fetch an unknown entry", lambda c: c.fetch(BAD_ID)),
        ("fetch a malformed id", lambda c: c.fetch("not an id")),
        ("fetch granted all the steps", by_id("a", "fetch", granted_steps=NS.total_steps)),
        ("get a, rebuilt", lambda c: c.get(at_similarity(a, 0.96, 9), rebuild=rebuild)),
        ("get a, rebuilt with the request's noise", lambda c: c.get(a, rebuild=rebuild, noise_seed=5)),
        ("get a, clean", lambda c: c.get(a)),
        ("get the row, as stored", lambda c: c.get(unit(13), rebuild=rebuild)),
        ("get float16 without a seed to rebuild", lambda c: c.get(unit(14), rebuild=rebuild)),
        ("get int32", lambda c: c.get(unit(15))),
        ("get composed", lambda c: c.get(unit(20), object_vector=dog, background_vector=beach, rebuild=rebuild,
                                         noise_seed=3)),
        ("get partial", lambda c: c.get(unit(20), object_vector=dog, background_vector=unit(21), rebuild=rebuild,
                                        noise_seed=3, partial_roles=("object",))),
        ("get a miss", lambda c: c.get(unit(30))),
        ("stats", lambda c: c.stats()),
        # refused: the daemon's INVALID_ARGUMENT and RESOURCE_EXHAUSTED, the client's own errors
        put("", latent(7), unit(31)),
        put("zero vector", latent(7), np.zeros(DIM, np.float32)),
        put("wrong dimension", latent(7), unit(31, DIM + 1)),
        put("NaN vector", latent(7), np.full(DIM, np.nan, np.float32)),
        put("step past the total", latent(7), unit(31), step=NS.total_steps),
        put("negative step seconds", latent(7), unit(31), step_seconds=-1.0),
        put("x" * 20_000, latent(7), unit(31)),
        put("object vector of another dimension", latent(7), unit(31), object_vector=unit(32, 8)),
        put("NaN latent", np.full((4, *GRID), np.nan, np.float32), unit(31)),
        put("too large for a small budget", np.arange(1 << 15, dtype=np.int64), unit(33)),
        ("lookup of the wrong dimension", lambda c: c.lookup(unit(34, DIM - 1))),
        ("lookup of a zero vector", lambda c: c.lookup(np.zeros(DIM, np.float32))),
        ("delete a", by_id("a", "delete")),
        ("delete a again", by_id("a", "delete")),
        ("delete a malformed id", lambda c: c.delete("nope")),
        ("lookup a, deleted", lambda c: c.lookup(a, top_k=3)),
        # step tables (docs/step_tables.md): the flags', set, refused, reported on, reset
        ("step tables, the flags'", lambda c: c.step_tables()),
        ("set step tables", lambda c: c.set_step_tables(StepTables(whole=((0.9, 0.3), (0.6, 0.1)),
                                                                   partial_object=((0.8, 0.2),), max_loss=1.5))),
        ("lookup b by the set table", lambda c: c.lookup(at_similarity(b, 0.93, 10), top_k=2)),
        ("lookup partial object by the set table",
         lambda c: c.lookup(unit(20), object_vector=at_similarity(dog, 0.85, 11), partial_roles=("object",))),
        ("set step tables, not monotone", lambda c: c.set_step_tables(StepTables(whole=((0.9, 0.1), (0.6, 0.3))))),
        ("set step tables, NaN", lambda c: c.set_step_tables(StepTables(whole=((float("nan"), 0.1),)))),
        ("report quality", lambda c: c.report_quality([QualitySample("whole", 0.93, 0.0, 15, 0.5),
                                                       QualitySample("whole", 0.93, 0.0, 20, 0.5),
                                                       QualitySample("composed", 0.95, 0.7, 5, -0.2)])),
        ("report quality, unknown table", lambda c: c.report_quality([QualitySample("nope", 0.9, 0.0, 1, 0.0)])),
        ("step tables, set", lambda c: c.step_tables()),
        ("reset step tables", lambda c: c.reset_step_tables()),
        ("stats at the end", lambda c: c.stats()),
    ]
    return ops


def test_scripted_operations_agree(pair: tuple[CacheBase, CacheBase]) -> None:
    ops = scripted()
    answers = run(pair, ops)
    assert any(isinstance(a, tuple) and a[0] == "hit" and a[1] == "composed" for a in answers)  # the script reaches
    assert any(isinstance(a, tuple) and a[0] == "hit" and a[1] == "partial" for a in answers)   # every kind of hit
    assert None in answers
    assert [a.source for a in answers if isinstance(a, StepTables)] == ["flags", "admin", "admin", "flags"]
    by_name = {name: answer for (name, _), answer in zip(ops, answers, strict=True)}
    assert by_name["report quality"] == 2  # the whole sample at the set table's K 15 and the composed one


@dataclass
class RandomScript:
    """Seeded operations over a few prompt families: puts near earlier vectors (with and without parts,
    masks, seeds, steps), lookups and gets at various similarities, fetches, deletes, stats, bad input."""

    rng: random.Random
    bases: list[np.ndarray] = field(default_factory=lambda: [unit(100 + i) for i in range(6)])
    parts: list[np.ndarray] = field(default_factory=lambda: [unit(200 + i) for i in range(6)])
    ids: list[str | None] = field(default_factory=list)

    def near(self, vectors: list[np.ndarray]) -> np.ndarray:
        similarity = self.rng.choice([1.0, 0.995, 0.97, 0.94, 0.9, 0.86, 0.8, 0.7, 0.4])
        base = self.rng.choice(vectors)
        return base if similarity == 1.0 else at_similarity(base, similarity, self.rng.randrange(1 << 30))

    def parts_of(self) -> dict[str, np.ndarray]:
        return {"object_vector": self.near(self.parts), "background_vector": self.near(self.parts)}

    def op(self, i: int) -> tuple[str, Op]:
        rng = self.rng
        kind = rng.choices(["put", "lookup", "get", "fetch", "delete", "stats", "bad"], [6, 3, 3, 2, 1, 1, 1])[0]
        if kind == "put":
            kwargs: dict[str, Any] = {}
            if rng.random() < 0.6:
                kwargs.update(self.parts_of())
                if rng.random() < 0.5:
                    kwargs["object_mask"] = box_mask(rng.randrange(3), rng.randrange(3))
            if rng.random() < 0.7:
                kwargs["seed"] = rng.randrange(1 << 31)
            elif rng.random() < 0.3:
                kwargs["step"] = rng.choice([5, 10, 20, 25])
            x = latent(rng.randrange(1 << 30), rng.choice(["float32", "float16"]))
            vector, prompt = self.near(self.bases), f"prompt {i}"

            def do_put(c: CacheBase) -> Any:
                entry = c.put(prompt, x, vector, **kwargs)
                if c is self.first:
                    self.ids.append(entry)
                return entry
            return f"put {i}", do_put
        if kind in ("lookup", "get"):
            kwargs = self.parts_of() if rng.random() < 0.5 else {}
            if rng.random() < 0.3:
                kwargs["partial_roles"] = rng.choice([("object",), ("background",), ("object", "background")])
            vector, top_k = self.near(self.bases), rng.randrange(1, 4)
            if kind == "lookup":
                return f"lookup {i}", lambda c: c.lookup(vector, top_k=top_k, **kwargs)
            noise = rng.choice([None, rng.randrange(1000)])
            return f"get {i}", lambda c: c.get(vector, top_k=top_k, rebuild=rebuild, noise_seed=noise, **kwargs)
        if kind in ("fetch", "delete"):
            pick = rng.random()
            role, granted = rng.choice(["full", "object", "background"]), rng.choice([0, 5, 25])

            def entry() -> str:
                known = [e for e in self.ids if e]
                return known[int(pick * len(known))] if known else BAD_ID
            if kind == "fetch":
                return f"fetch {i}", lambda c: c.fetch(entry(), role=role, granted_steps=granted)
            return f"delete {i}", lambda c: c.delete(entry())
        if kind == "stats":
            return f"stats {i}", lambda c: c.stats()
        bad = rng.choice([lambda c: c.put(" ", latent(1), unit(1)), lambda c: c.lookup(unit(1, 3)),
                          lambda c: c.fetch("short"), lambda c: c.put("p", latent(1), np.zeros(DIM, np.float32))])
        return f"bad input {i}", bad

    first: CacheBase | None = None


@pytest.mark.parametrize("seed", [0, 1])
def test_random_operations_agree(pair: tuple[CacheBase, CacheBase], seed: int) -> None:
    script = RandomScript(random.Random(seed))
    script.first = pair[0]
    answers = run(pair, [script.op(i) for i in range(80)])
    assert sum(isinstance(a, tuple) and a[0] == "hit" for a in answers) >= 3


def test_every_domain_error_names_a_status() -> None:
    """Both backends answer a domain error with its `code`: every one must be a real gRPC status."""
    import grpc

    from flexcache.daemon import errors

    kinds = [k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.CacheError)]
    assert len(kinds) > 5
    for kind in kinds:
        assert grpc.StatusCode[kind.code] is not None, kind


def test_local_cache_needs_the_daemon_extra(tmp_path: Path) -> None:
    """Without RocksDB installed, importing the client works and making a LocalCache says which extra to install."""
    code = (
        "import sys; sys.modules['rocksdict'] = None\n"  # as if the package were not installed
        "import flexcache.client as fc\n"
        "from flexcache.client.optional import MissingExtra\n"
        "from flexcache.client import LocalCache\n"
        "prefixes = ('rocksdict', 'qdrant', 'flexcache.daemon')\n"
        "loaded = [m for m in sys.modules if m.startswith(prefixes) and sys.modules[m]]\n"
        "assert not loaded, loaded\n"
        "try:\n"
        f"    LocalCache({str(tmp_path / 'x')!r}, fc.Namespace('t', 'm'))\n"
        "except MissingExtra as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "LocalCache needs rocksdict" in result.stdout and "pip install 'flexcache[daemon]'" in result.stdout


def test_importing_the_client_opens_no_storage() -> None:
    """flexcache.client and flexcache.client.LocalCache import no RocksDB, Qdrant or daemon code."""
    code = ("import sys, flexcache.client as fc; fc.LocalCache\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('rocksdict', 'qdrant_client', 'qdrant_edge', "
            "'torch', 'prometheus_client') or m.startswith('flexcache.daemon')]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
