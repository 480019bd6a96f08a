"""The benchmark trace builder (bench/traces.py): popularity shape, paraphrase grouping, reproducibility.

Fast and model-free: traces are built from small synthetic intents, and the real suites only when
they are present on this machine.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from bench import traces


def _intents(n: int, paraphrases: int = 3) -> list[traces.Intent]:
    return [traces.Intent("synthetic", tuple(f"intent {i} wording {j}" for j in range(paraphrases)))
            for i in range(n)]


def test_zipf_probabilities_follow_the_power_law() -> None:
    p = traces.zipf_probabilities(100, 0.8)
    assert p.sum() == pytest.approx(1.0)
    assert np.all(np.diff(p) < 0)
    assert p[0] / p[9] == pytest.approx(10 ** 0.8)


def test_trace_popularity_is_zipf_over_intents() -> None:
    intents = _intents(50)
    trace = traces.build_trace(intents, requests=20_000, warmup=0, zipf_s=1.0, seed=3)
    counts = sorted(Counter(r.intent for r in trace.requests).values(), reverse=True)
    expected = traces.zipf_probabilities(50, 1.0) * 20_000
    # The most popular intents are drawn in Zipf proportions (sampling noise well under 10%).
    assert counts[0] == pytest.approx(expected[0], rel=0.1)
    assert counts[4] == pytest.approx(expected[4], rel=0.15)


def test_reshuffled_popularity_changes_the_hot_set_on_schedule() -> None:
    intents = _intents(200)
    plain = traces.build_trace(intents, requests=6_000, warmup=0, zipf_s=1.0, seed=3)
    trend = traces.build_trace(intents, requests=6_000, warmup=0, zipf_s=1.0, seed=3, reshuffle_every=2_000)

    def top(requests) -> set[int]:
        return {i for i, _ in Counter(r.intent for r in requests).most_common(5)}

    # The same order throughout without reshuffling; three different hot sets with it.
    assert len(top(plain.requests[:2_000]) & top(plain.requests[4_000:])) >= 4
    phases = [top(trend.requests[n:n + 2_000]) for n in (0, 2_000, 4_000)]
    assert all(len(a & b) <= 1 for a, b in [(phases[0], phases[1]), (phases[1], phases[2])])
    assert "reshuffled every 2000" in trend.label
    counts = sorted(Counter(r.intent for r in trend.requests[2_000:4_000]).values(), reverse=True)
    assert counts[0] == pytest.approx(traces.zipf_probabilities(200, 1.0)[0] * 2_000, rel=0.25)


def test_requests_pick_paraphrases_of_their_intent_uniformly() -> None:
    intents = _intents(5, paraphrases=4)
    trace = traces.build_trace(intents, requests=8_000, warmup=0, zipf_s=0.5, seed=1)
    for r in trace.requests:
        assert r.text == intents[r.intent].paraphrases[r.paraphrase]
    per_paraphrase = Counter(r.paraphrase for r in trace.requests)
    assert min(per_paraphrase.values()) > 0.2 * 8_000  # uniform would be 25% each


def test_same_seed_same_trace_and_warmup_split() -> None:
    intents = _intents(30)
    a = traces.build_trace(intents, requests=300, warmup=100, zipf_s=0.8, seed=7)
    b = traces.build_trace(intents, requests=300, warmup=100, zipf_s=0.8, seed=7)
    c = traces.build_trace(intents, requests=300, warmup=100, zipf_s=0.8, seed=8)
    assert a.requests == b.requests
    assert a.requests != c.requests
    assert len(a.requests) == 400 and len(a.measured) == 300 and a.measured == a.requests[100:]
    assert traces.sample_intents(intents, 10, 7) == traces.sample_intents(intents, 10, 7)
    assert len(traces.sample_intents(intents, 10, 7)) == 10


def test_describe_counts_repeats_only_in_the_measured_part() -> None:
    intents = _intents(1, paraphrases=1)
    trace = traces.build_trace(intents, requests=5, warmup=2, zipf_s=0.8, seed=0)
    facts = traces.describe(trace)
    assert facts["distinct_texts_requested"] == 1
    assert facts["measured_repeats_of_earlier_text"] == 5


def test_real_suites_group_rewrites_as_paraphrases() -> None:
    intents = traces.load_intents()
    texts = [t for i in intents for t in i.paraphrases]
    assert len(texts) == len(set(texts))  # every text belongs to exactly one intent
    by_source = Counter(i.source for i in intents)
    assert {"vbench-dimension", "vbench-category", "vbench2", "open-sora", "fetv"} <= set(by_source)
    vb = [i for i in intents if i.source == "vbench-dimension"]
    assert sum(len(i.paraphrases) == 4 for i in vb) > 0.9 * len(vb)  # original + 3 LLM rewrites
    assert all(len(i.paraphrases) == 1 for i in intents if i.source == "fetv")
    assert not any("{" in t or "|" in t for i in intents if i.source == "open-sora" for t in i.paraphrases)


def test_cold_trace_asks_each_intent_once_in_its_original_wording() -> None:
    intents = _intents(50)
    trace = traces.build_cold_trace(intents, cached=10, new=30, seed=4)
    assert len(trace.requests) == 40 and len(trace.measured) == 30 and trace.warmup == 10
    assert len({r.intent for r in trace.requests}) == 40
    assert all(r.paraphrase == 0 and r.text == intents[r.intent].paraphrases[0] for r in trace.requests)
    assert traces.describe(trace)["measured_repeats_of_earlier_text"] == 0
    assert trace.requests == traces.build_cold_trace(intents, cached=10, new=30, seed=4).requests
    assert "cold" in trace.label and traces.build_trace(intents, 5, 0, 0.8, 0).label == "Zipf s = 0.8"
    with pytest.raises(ValueError):
        traces.build_cold_trace(intents, cached=30, new=30, seed=4)
