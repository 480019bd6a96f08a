"""Per-namespace step tables set at run time, persisted, and the online quality guard (docs/step_tables.md),
on real daemon processes:

- set tables, and lookups grant what they say (whole, composed, partial); tables before any entry;
- invalid tables and reports are INVALID_ARGUMENT with a sentence, and the daemon keeps serving;
- with auth on, only an admin sets tables; a tenant reads and reports on its own namespaces only;
- tables (set, and the guard's) survive a restart; the guard's counts do not;
- the guard lowers a tier (and those it dominates) after enough bad reports, raises it back after good
  ones but never above the set table, ignores stale samples, and counts it all in its metrics;
- a namespace without tables of its own keeps the flags' behaviour;
- in a cluster, tables set through any member apply on all, and one member decides on reports; the
  member that decides after it goes on from its figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from flexcache.client import CacheClient, Namespace, QualitySample, StepTables
from flexcache.daemon import auth
from flexcache.daemon.process import DaemonCluster, wait_members
from flexcache.v1 import cache_pb2 as pb
from flexcache.v1 import cache_pb2_grpc as pb_grpc
from flexcache.v1 import node_pb2 as npb
from flexcache.v1 import node_pb2_grpc as npb_grpc
from tests.conftest import NS, connect, metric
from tests.vectors import at_similarity, unit

MASK = np.zeros((3, 12, 20), bool)
MASK[:, 4:8, 5:11] = True
DOG, FOREST, CAT, BEACH = unit(1), unit(4), unit(3), unit(2)
WHOLE = unit(10)
CLUSTER = {"peer_probe_seconds": 0.2, "peer_timeout_seconds": 1.0, "repair_interval_seconds": 0.5,
           "scrub_bytes_per_second": 0, "guard_min_samples": 3}
SET = StepTables(whole=((0.9, 0.6), (0.5, 0.2)), composed=((0.8, 0.8, 0.3), (0.6, 0.6, 0.1)),
                 partial_object=((0.7, 0.2),), partial_background=((0.95, 0.04),))


def fill(client: CacheClient) -> None:
    """A whole-prompt entry, and two entries with parts (a dog in a forest, a cat on a beach)."""
    assert client.put("a corgi", np.ones(8, np.float32), WHOLE, seed=1)
    assert client.put("a dog in a forest", np.ones(8, np.float32), unit(11), object_vector=DOG,
                      background_vector=FOREST, object_mask=MASK, seed=2)
    assert client.put("a cat on a beach", np.zeros(8, np.float32), unit(12), object_vector=CAT,
                      background_vector=BEACH, object_mask=MASK, seed=3)


def whole_k(client: CacheClient, similarity: float) -> int:
    result = client.lookup(at_similarity(WHOLE, similarity, 50))
    return result.best.granted_steps if result.best else 0


def composed(client: CacheClient, object_similarity: float, background_similarity: float) -> tuple[str, list[int]]:
    result = client.lookup(unit(20), object_vector=at_similarity(DOG, object_similarity, 51),
                           background_vector=at_similarity(BEACH, background_similarity, 52))
    kinds = {c.role for c in result.candidates}
    return ("composed" if kinds == {"object", "background"} else "/".join(sorted(kinds)) or "miss",
            [c.granted_steps for c in result.candidates])


def test_set_tables_then_lookups_grant_what_they_say(client: CacheClient) -> None:
    fill(client)
    flags = client.step_tables()
    assert flags.source == "flags" and flags.whole == ((0.95, 0.5), (0.9, 0.4), (0.85, 0.3), (0.75, 0.2), (0.65, 0.1))
    assert len(flags.composed) == 25 and max(f for _, _, f in flags.composed) == 0.1  # composed_max_fraction
    assert flags.partial_object == flags.partial_background == tuple((s, 0.1) for s, _ in flags.whole)
    assert whole_k(client, 0.96) == 25 and composed(client, 0.93, 0.97) == ("composed", [5, 5])

    answer = client.set_step_tables(SET)
    assert answer == StepTables(SET.whole, SET.composed, SET.partial_object, SET.partial_background, 0.0, "admin")
    assert whole_k(client, 0.96) == 30 and whole_k(client, 0.6) == 10 and whole_k(client, 0.4) == 0
    assert composed(client, 0.85, 0.9) == ("composed", [15, 15])
    assert composed(client, 0.7, 0.9) == ("composed", [5, 5])  # only the (0.6, 0.6) tier's minima are met
    assert composed(client, 0.5, 0.9) == ("miss", [])
    # A partial hit by the part's own table: the object donor at 0.75 qualifies by partial_object alone.
    result = client.lookup(unit(20), object_vector=at_similarity(DOG, 0.75, 53), background_vector=unit(21),
                           partial_roles=("object",))
    assert [(c.role, c.granted_steps) for c in result.candidates] == [("object", 10)]
    result = client.lookup(unit(20), background_vector=at_similarity(FOREST, 0.96, 54), partial_roles=("background",))
    assert [(c.role, c.granted_steps) for c in result.candidates] == [("background", 2)]
    assert client.step_tables().source == "admin"
    assert SET.grant(0.96, 50) == 30 and SET.composed_grant(0.85, 0.9, 50) == 15 and SET.grant(0.75, 50,
                                                                                               "partial_object") == 10

    # Empty composed and partial lists are derived from the set whole table, as the flags' are.
    derived = client.set_step_tables(StepTables(whole=((0.9, 0.6), (0.5, 0.2))))
    assert derived.composed == ((0.9, 0.9, 0.1), (0.9, 0.5, 0.1), (0.5, 0.9, 0.1), (0.5, 0.5, 0.1))
    assert derived.partial_object == derived.partial_background == ((0.9, 0.1), (0.5, 0.1))
    assert client.reset_step_tables().source == "flags"
    assert whole_k(client, 0.96) == 25


def test_tables_may_be_set_before_the_namespace_holds_entries(client: CacheClient, daemon) -> None:
    with connect(daemon.target, Namespace("acme", "other-model", total_steps=30)) as fresh:
        assert fresh.set_step_tables(StepTables(whole=((0.8, 0.5),))).source == "admin"
        assert fresh.step_tables().whole == ((0.8, 0.5),)
        assert fresh.lookup(unit(1)).miss_reason == "unknown_namespace"
        fresh.put("p", np.ones(8, np.float32), unit(1))
        assert fresh.lookup(at_similarity(unit(1), 0.85, 3)).best.granted_steps == 15
    assert client.step_tables().source == "flags"  # another namespace's tables are its own


@pytest.mark.parametrize(("tables", "words"), [
    (StepTables(whole=((0.9, 0.1), (0.6, 0.3))), "tables.whole[1] grants more (0.3) than tables.whole[0]"),
    (StepTables(whole=((0.6, 0.1), (0.9, 0.3))), "tables.whole[1] (min_similarity 0.9) must ask for less"),
    (StepTables(whole=((float("nan"), 0.1),)), "tables.whole[0] has a NaN or infinite value"),
    (StepTables(whole=((1.5, 0.1),)), "tables.whole[0]: similarities must be in [-1, 1]"),
    (StepTables(whole=((0.9, 1.0),)), "tables.whole[0]: the fraction must be in [0, 1)"),
    (StepTables(whole=()), "tables.whole needs at least one tier"),
    (StepTables(whole=tuple((1 - i / 100, 0.1) for i in range(65))), "tables.whole has 65 tiers, above 64"),
    (StepTables(whole=((0.9, 0.5),), composed=((0.9, 0.9, 0.1), (0.8, 0.9, 0.2))),
     "tables.composed[1] grants more (0.2) than tables.composed[0] (0.1)"),
    (StepTables(whole=((0.9, 0.5),), partial_object=((0.9, 0.1), (0.8, 0.2))),
     "tables.partial_object[1] grants more"),
    (StepTables(whole=((0.9, 0.5),), max_loss=-1.0), "tables.max_loss must be a number of at least 0"),
])
def test_invalid_tables_are_refused_with_a_sentence(client: CacheClient, tables: StepTables, words: str) -> None:
    assert client.set_step_tables(tables) is None
    assert client.last_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in client.last_error.details()
    assert client.step_tables().source == "flags" and client.stats() is not None  # unchanged, still serving


def test_invalid_reports_are_refused(client: CacheClient, daemon) -> None:
    for samples, words in [([QualitySample("whole", 0.9, 0.0, 1, 0.0)] * 1025, "above 1024"),
                           ([QualitySample("wholes", 0.9, 0.0, 1, 0.0)], "samples[0].table 'wholes' is not one of"),
                           ([QualitySample("whole", 0.9, 0.0, 1, float("inf"))], "samples[0] has a NaN")]:
        assert client.report_quality(samples) is None
        assert client.last_error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in client.last_error.details()
    with grpc.insecure_channel(daemon.target) as channel:  # a namespace is required, as for every call
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.CacheServiceStub(channel).ReportQuality(pb.ReportQualityRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.stats() is not None


def test_only_an_admin_sets_tables(start_daemon, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tenant, _ = auth.add_token(tokens, "acme")
    other, _ = auth.add_token(tokens, "globex")
    admin, _ = auth.add_token(tokens, "", admin=True)
    daemon = start_daemon(auth_tokens_file=tokens)
    with connect(daemon.target, token=tenant) as worker, connect(daemon.target, token=admin) as operator, \
            connect(daemon.target, token=other) as stranger:
        assert worker.set_step_tables(SET) is None
        assert worker.last_error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in worker.last_error.details()
        assert worker.reset_step_tables() is None
        assert operator.set_step_tables(SET).source == "admin"
        assert worker.step_tables().whole == SET.whole  # its own namespace: readable
        assert worker.report_quality([QualitySample("whole", 0.95, 0.0, 30, 0.0)]) == 1  # its own namespace
        assert stranger.step_tables() is None  # another tenant's namespace (NS is acme's)
        assert stranger.last_error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert stranger.report_quality([]) is None
    assert metric(daemon, "flexcache_calls_refused_total", method="SetStepTables", reason="permission_denied") == 2


def report(client: CacheClient, n: int, *, k: int, loss: float, similarity: float = 0.95) -> int:
    return client.report_quality([QualitySample("whole", similarity, 0.0, k, loss)] * n)


def test_the_guard_lowers_then_raises_back_never_above_the_set_table(start_daemon) -> None:
    daemon = start_daemon(guard_min_samples=5, guard_step_fraction=0.4)  # guard_max_loss 0: the tables' max_loss
    with connect(daemon.target) as client:
        fill(client)
        client.set_step_tables(StepTables(whole=((0.9, 0.5), (0.5, 0.2)), max_loss=1.0))
        assert whole_k(client, 0.95) == 25 and whole_k(client, 0.6) == 10
        assert report(client, 4, k=25, loss=5.0) == 4
        assert whole_k(client, 0.95) == 25  # 4 samples: fewer than guard_min_samples
        assert report(client, 1, k=25, loss=5.0) == 1
        # 0.5 -> 0.1, and the tier it dominates (0.2) down to at most that: the table stays monotone.
        tables = client.step_tables()
        assert tables.source == "guard" and tables.whole == ((0.9, 0.1), (0.5, 0.1)) and tables.guard_changes == 1
        assert tables.bins == ()  # the changed tiers' figures restart
        assert whole_k(client, 0.95) == 5 and whole_k(client, 0.6) == 5
        assert report(client, 10, k=25, loss=0.0) == 0  # stale: taken at the old grant, not used
        assert client.step_tables().whole[0] == (0.9, 0.1)
        assert report(client, 14, k=5, loss=0.0) == 14
        bins = client.step_tables().bins
        assert [(b.table, b.tier, b.granted_steps, b.samples, b.mean_loss) for b in bins] == [("whole", 0, 5, 14, 0.0)]
        assert report(client, 1, k=5, loss=0.0) == 1  # 3 x guard_min_samples good ones: given back
        assert client.step_tables().whole == ((0.9, 0.5), (0.5, 0.1))  # 0.1 + 0.4, capped at the set 0.5
        assert whole_k(client, 0.95) == 25
        assert report(client, 15, k=25, loss=0.0) == 15
        tables = client.step_tables()
        assert tables.whole[0] == (0.9, 0.5) and tables.guard_changes == 2  # never above the set table
        assert tables.source == "guard"  # tier 1 is still below what was set
    assert metric(daemon, "flexcache_guard_changes_total", table="whole", direction="lower") == 1
    assert metric(daemon, "flexcache_guard_changes_total", table="whole", direction="raise") == 1
    assert metric(daemon, "flexcache_guard_samples_total", table="whole", result="accepted") == 35
    assert metric(daemon, "flexcache_guard_samples_total", table="whole", result="stale") == 10
    log = daemon.log.read_text()
    assert f"quality guard: namespace {NS.tenant}/{NS.model}" in log and "K 25 -> 5" in log and "K 5 -> 25" in log


def test_the_guard_acts_on_evidence_of_loss_not_on_noise(start_daemon) -> None:
    """Losses as noisy as a clip's score (sd 20 points): a tier whose mean is within the budget keeps its K
    however wide its bounds, and one whose mean is far above it is lowered once the lower bound shows it."""
    daemon = start_daemon(guard_max_loss=1.0, guard_min_samples=20, guard_confidence=0.9)
    rng = np.random.default_rng(0)
    with connect(daemon.target) as client:
        fill(client)
        noise = rng.normal(0.0, 20.0, 60)
        fine = [QualitySample("whole", 0.96, 0.0, 25, float(x)) for x in noise - noise.mean() + 0.5]
        assert client.report_quality(fine) == 60
        tables = client.step_tables()
        assert tables.whole[0] == (0.95, 0.5) and tables.guard_changes == 0
        (fig,) = tables.bins
        assert fig.samples == 60 and fig.lower_bound < 1.0 < fig.upper_bound  # no evidence either way
        bad = [QualitySample("whole", 0.8, 0.0, 10, float(x)) for x in rng.normal(15.0, 20.0, 40)]
        taken = 0
        while client.step_tables().whole[3] == (0.75, 0.2) and taken < len(bad):
            taken += client.report_quality(bad[taken:taken + 1])
        assert client.step_tables().whole[3] == (0.75, 0.1) and 20 <= taken < 40
        assert client.step_tables().whole[0] == (0.95, 0.5)  # a tier's evidence moves only it and those below


def test_the_guard_lowers_composed_tiers(start_daemon) -> None:
    daemon = start_daemon(guard_max_loss=2.0, guard_min_samples=3, guard_step_fraction=0.1)
    with connect(daemon.target) as client:
        fill(client)
        client.set_step_tables(SET)
        assert composed(client, 0.85, 0.9) == ("composed", [15, 15])
        samples = [QualitySample("composed", 0.85, 0.9, 15, 4.0)] * 3
        assert client.report_quality(samples) == 3
        assert client.step_tables().composed == ((0.8, 0.8, 0.2), (0.6, 0.6, 0.1))
        assert composed(client, 0.85, 0.9) == ("composed", [10, 10])
    assert metric(daemon, "flexcache_guard_changes_total", table="composed", direction="lower") == 1


def test_the_flags_tables_are_guarded_by_guard_max_loss(start_daemon) -> None:
    daemon = start_daemon(guard_max_loss=1.0, guard_min_samples=3)
    with connect(daemon.target) as client:
        fill(client)
        assert report(client, 3, k=25, loss=3.0) == 3
        tables = client.step_tables()
        assert tables.source == "guard" and tables.whole[:2] == ((0.95, 0.4), (0.9, 0.4))
        assert whole_k(client, 0.96) == 20
        assert report(client, 9, k=20, loss=0.0) == 9  # all given back: the flags' tables again, nothing of its own
        assert client.step_tables().source == "flags" and whole_k(client, 0.96) == 25
    with connect(daemon.target, Namespace("acme", "made-up")) as stranger:  # held by no entry, no tables
        assert stranger.report_quality([QualitySample("whole", 0.96, 0.0, 25, 9.0)] * 3) == 0
    assert metric(daemon, "flexcache_guard_samples_total", result="stale") == 3


def test_tables_and_the_guard_figures_survive_a_restart(start_daemon) -> None:
    """Tables and the guard's figures are persisted (a shadow sample costs a generation from scratch);
    `guard_changes` counts since the start; new tables drop the figures of the old, restart or not."""
    daemon = start_daemon(guard_min_samples=3)
    other = Namespace("acme", "other-model", total_steps=30)
    with connect(daemon.target) as client, connect(daemon.target, other) as second:
        fill(client)
        client.set_step_tables(StepTables(whole=((0.9, 0.5), (0.5, 0.2)), max_loss=1.0))
        assert report(client, 3, k=25, loss=5.0) == 3  # the guard: 0.5 -> 0.4
        assert report(client, 2, k=10, loss=0.0, similarity=0.6) == 2  # figures, below any decision
        second.set_step_tables(StepTables(whole=((0.7, 0.3),)))  # a namespace with no entry
        before, before_second = client.step_tables(), second.step_tables()
        assert before.source == "guard" and len(before.bins) == 1
    daemon.terminate()
    daemon.start()
    with connect(daemon.target) as client, connect(daemon.target, other) as second:
        after = client.step_tables()
        assert (after.whole, after.source, after.bins, after.guard_changes) == (before.whole, "guard", before.bins, 0)
        assert whole_k(client, 0.95) == 20
        assert second.step_tables() == before_second
        # What the guard took it still gives back up to the set table, not past it.
        assert report(client, 9, k=20, loss=0.0) == 9
        assert client.step_tables().whole[0] == (0.9, 0.5)
        assert len(client.step_tables().bins) == 1  # tier 1's two samples are still there
        client.reset_step_tables()
    daemon.terminate()
    daemon.start()
    with connect(daemon.target) as client:
        after_reset = client.step_tables()
        assert after_reset.source == "flags" and after_reset.bins == () and whole_k(client, 0.96) == 25


def test_a_cluster_shares_its_tables_and_one_member_decides(tmp_path: Path) -> None:
    """SetStepTables on any member applies on every serving member; ReportQuality through any member is
    counted by one (the namespace's deciding member), whose guard's changes reach the others, and
    GetStepTables through any member answers with that member's figures."""
    with DaemonCluster(tmp_path, 3, **CLUSTER) as cluster:
        wait_members(cluster.members, 3)
        clients = [connect(t) for t in cluster.targets]
        try:
            fill(clients[0])
            set_tables = StepTables(whole=((0.9, 0.5), (0.5, 0.2)), max_loss=1.0)
            assert clients[1].set_step_tables(set_tables).source == "admin"
            for c in clients:
                assert c.step_tables().whole == set_tables.whole and whole_k(c, 0.95) == 25
            for i in range(3):  # through every member in turn: all counted in one place
                assert clients[i].report_quality([QualitySample("whole", 0.95, 0.0, 25, 5.0)]) == 1
            for c in clients:
                assert c.step_tables().whole == ((0.9, 0.4), (0.5, 0.2)) and whole_k(c, 0.95) == 20
            assert sum(metric(n, "flexcache_guard_changes_total", direction="lower") for n in cluster.members) == 1
            # GetStepTables through any member is the deciding member's answer, with the guard's figures
            assert [c.step_tables().guard_changes for c in clients] == [1, 1, 1]
            assert clients[2].reset_step_tables().source == "flags"
            assert all(c.step_tables().source == "flags" for c in clients)
        finally:
            for c in clients:
                c.close()


def _eventually(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_a_member_that_missed_changes_catches_up_and_older_tables_never_win(tmp_path: Path) -> None:
    """A member that was down while a namespace's tables changed gets the change at a repair pass
    (SyncStepTables), a reset included; the older tables it kept meanwhile never overwrite the newer
    ones on the others, restarts of any member included (versions are persisted)."""
    first = StepTables(whole=((0.9, 0.5), (0.5, 0.2)), max_loss=1.0)
    second = StepTables(whole=((0.9, 0.3),), max_loss=1.0)
    with DaemonCluster(tmp_path, 3, **CLUSTER) as cluster:
        wait_members(cluster.members, 3)
        late = cluster.members[2]
        with connect(cluster.targets[0]) as c0, connect(cluster.targets[1]) as c1:
            fill(c0)
            c0.set_step_tables(first)
            with connect(late.target) as c2:
                assert c2.step_tables().whole == first.whole
            late.terminate()
            c1.set_step_tables(second)  # the late member misses it
            cluster.members[0].terminate()  # and a member that has it restarts: its version is persisted
            cluster.members[0].start()
            late.start()
            wait_members(cluster.members, 3, timeout=30)
            with connect(late.target) as c2:
                assert _eventually(lambda: c2.step_tables().whole == second.whole)
            time.sleep(1.5)  # passes of every member: the late one's older tables won nowhere
            for target in cluster.targets:
                with connect(target) as c:
                    assert c.step_tables().whole == second.whole
            node = npb_grpc.NodeServiceStub(cluster.members[0].channel())
            bad = npb.StepTablesSync(namespaces=[npb.NamespaceStepTables(namespace_key="../x", version=1)])
            with pytest.raises(grpc.RpcError) as refused:
                node.SyncStepTables(bad, timeout=5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "namespace key" in refused.value.details()
            late.terminate()
            assert c1.reset_step_tables().source == "flags"  # missed too: the reset must win over `second`
            late.start()
            wait_members(cluster.members, 3, timeout=30)
            with connect(late.target) as c2:
                assert _eventually(lambda: c2.step_tables().source == "flags")
            time.sleep(1.5)
            for target in cluster.targets:
                with connect(target) as c:
                    assert c.step_tables().source == "flags"


def _local_samples(member) -> int:
    """The samples of the guard's figures on `member` itself (NodeService.StepTablesLocal), not forwarded."""
    answer = npb_grpc.NodeServiceStub(member.channel()).StepTablesLocal(pb.StepTablesRequest(namespace=NS.to_proto()),
                                                                        timeout=5)
    return sum(b.samples for b in answer.bins)


def test_the_member_deciding_after_a_lost_one_goes_on_from_its_figures(tmp_path: Path) -> None:
    """Repair passes give the deciding member's guard figures to the others, so the member that decides
    while it is down goes on counting from them (not from nothing); when it is back, the figures over
    more samples win there too. Figures that do not fit a member's tables are refused, its own kept."""
    with DaemonCluster(tmp_path, 3, **CLUSTER) as cluster:
        wait_members(cluster.members, 3)
        with connect(cluster.targets[0]) as c0:
            fill(c0)
            c0.set_step_tables(StepTables(whole=((0.9, 0.5), (0.5, 0.2)), max_loss=1.0))
            assert report(c0, 2, k=25, loss=0.0) == 2  # below guard_min_samples: figures, no decision
        (decider,) = [m for m in cluster.members if metric(m, "flexcache_guard_samples_total", result="accepted")]
        assert _eventually(lambda: [_local_samples(m) for m in cluster.members] == [2, 2, 2])
        decider.terminate()
        survivors = [m for m in cluster.members if m is not decider]
        wait_members(survivors, 2, timeout=30)
        with connect(survivors[0].target) as c:
            assert report(c, 1, k=25, loss=0.0) == 1
            (fig,) = c.step_tables().bins
            assert fig.samples == 3  # counted on from the lost member's two
        decider.start()  # it decides again, and has its own two samples persisted
        wait_members(cluster.members, 3, timeout=30)
        assert _eventually(lambda: [_local_samples(m) for m in cluster.members] == [3, 3, 3])
        with connect(decider.target) as c:
            assert report(c, 1, k=25, loss=0.0) == 1 and c.step_tables().bins[0].samples == 4
        node = npb_grpc.NodeServiceStub(decider.channel())
        everything = node.SyncStepTables(npb.StepTablesSync(), timeout=5)  # it lists nothing: all of its own
        key, version = everything.figures[0].namespace_key, everything.namespaces[0].version
        unfit = npb.NamespaceGuardFigures(namespace_key=key, name="x", table_version=version,
                                          bins=[npb.GuardBinFigures(table="whole", tier=7, samples=99)])
        node.SyncStepTables(npb.StepTablesSync(figures=[unfit]), timeout=5)
        assert _local_samples(decider) == 4
        with pytest.raises(grpc.RpcError) as refused:
            node.SyncStepTables(npb.StepTablesSync(figures=[npb.NamespaceGuardFigures(namespace_key="../x")]),
                                timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "figures[0]" in refused.value.details()
