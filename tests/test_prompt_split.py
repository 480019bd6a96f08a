"""Tests for flexcache.client.prompt_split: constructions, edge cases, label floors, speed."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from flexcache.client.prompt_split import PromptSplit, PromptSplitter, split_prompt

DATA = Path(__file__).resolve().parents[1] / "bench" / "prompts"  # the vendored suites (bench/prompts/NOTICE.md)


def _bench() -> ModuleType:
    """Import bench/bench_split.py (not a package) for its label loaders and metric."""
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_split.py"
    spec = importlib.util.spec_from_file_location("bench_split", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_split"] = mod
    spec.loader.exec_module(mod)
    return mod


def _has(part: str, word: str) -> bool:
    return word.lower() in part.lower()


# ---- constructions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "obj", "bg"),
    [
        # place prepositional phrase + time of day
        ("a dog running on the beach at sunset", "a dog running", "on the beach at sunset"),
        ("a man in a red suit walking in a forest", "a man in a red suit walking", "in a forest"),
        # relational "on the left of" keeps both objects; view words go to background/style
        ("a bird on the left of a cat, front view", "a bird on the left of a cat", "front view"),
        ("a toaster on the top of a microwave", "a toaster on the top of a microwave", ""),
        # the preposition opens the prompt
        ("In a still frame, a stop sign", "a stop sign", "In a still frame"),
        # whole prompt is a scene, incl. the "X of Y" frame pattern
        ("A tranquil tableau of alley", "", "A tranquil tableau of alley"),
        ("alley", "", "alley"),
        ("a person", "a person", ""),
        # camera / style chunks
        ("close-up of a corgi, cinematic, 4k, slow pan", "a corgi", "close-up, cinematic, 4k, slow pan"),
        # attribute phrase is not a place
        ("a toilet, frozen in time", "a toilet, frozen in time", ""),
        # noun-less fragment before a comma continues the phrase
        (
            "In a lush, vibrant forest clearing, a majestic elephant stands",
            "a majestic elephant stands",
            "In a lush, vibrant forest clearing",
        ),
    ],
)
def test_constructions(prompt: str, obj: str, bg: str) -> None:
    sp = split_prompt(prompt)
    assert (sp.object, sp.background) == (obj, bg)


@pytest.mark.parametrize(
    ("prompt", "obj", "bg"),
    [
        (
            "a red square drifting left over a striped blue background",
            "a red square drifting left",
            "over a striped blue background",
        ),
        (
            "blue stripes behind a small red square moving to the left",
            "a small red square moving to the left",
            "blue stripes",
        ),
        ("a small green circle bouncing, night with stars", "a small green circle bouncing", "night with stars"),
    ],
)
def test_procedural_captions(prompt: str, obj: str, bg: str) -> None:
    sp = split_prompt(prompt)
    assert (sp.object, sp.background) == (obj, bg)


@pytest.mark.parametrize(
    ("prompt", "obj", "bg"),
    [
        # issue 21: a drone that flies is a subject; the sun as the subject of a clause is an object
        ("A drone flies rightwards in the sky", "A drone flies rightwards", "in the sky"),
        (
            "The sun rises, moving upwards behind stationary buildings",
            "The sun rises, moving upwards",
            "behind stationary buildings",
        ),
        ("A black drone is floating in the air.", "A black drone is floating", "in the air."),
        ("The moon changes from silver to yellow.", "The moon changes from silver to yellow.", ""),
        (
            "The sun is setting behind the mountains, casting long shadows",
            "The sun is setting, casting long shadows",
            "behind the mountains",
        ),
        ("A cloud drifts slowly across the blue sky", "A cloud drifts slowly", "across the blue sky"),
        # ... while the same words as phrases stay camera / weather
        ("drone shot of a beach at sunset", "", "drone shot of a beach at sunset"),
        ("Clouds roll over the mountains", "", "Clouds roll over the mountains"),
        ("The camera pans to the left over a city", "", "The camera pans to the left over a city"),
        # a camera word with a material is a thing; noun + -s verb + determiner ends the subject
        ("The wooden frame transformed into a metal frame.", "The wooden frame transformed into a metal frame.", ""),
        (
            "One person hands a camera to another person to take a photo.",
            "One person hands a camera to another person to take a photo.",
            "",
        ),
        # what a camera move lands on or follows is the subject
        (
            "The camera slowly zooms in on a cat sleeping on a sofa",
            "a cat sleeping on a sofa",
            "The camera slowly zooms",
        ),
        (
            "The camera tracks a red sports car speeding along a coastal highway",
            "a red sports car speeding",
            "The camera tracks, along a coastal highway",
        ),
        # two subjects, vehicles
        ("A cat and a dog are playing in the park", "A cat and a dog are playing", "in the park"),
        ("A dog chases a cat across the field", "A dog chases a cat", "across the field"),
        ("A police car chases a motorcycle down the highway", "A police car chases a motorcycle", "down the highway"),
        # a passive agent ends a place phrase: it is an actor
        ("A mug is thrown into the air by the pillow", "A mug is thrown, by the pillow", "into the air"),
        # coordinated subjects: the verb after the second subject makes the first a subject too
        (
            "A red drone and a yellow kite are flying over the lake.",
            "A red drone and a yellow kite are flying",
            "over the lake.",
        ),
        ("The sun and a cloud are drifting across the sky.", "The sun and a cloud are drifting", "across the sky."),
        ("The drone and the camera pan left.", "", "The drone and the camera pan left."),
        # a scene word after "<noun> <-s verb> it" does not swallow the clause
        ("The cat catches it mid-air.", "The cat catches it mid-air.", ""),
        # a thing's possessive inside a place phrase stays with the object; the place goes to background
        ("The kite flies into the sloth's path", "The kite flies, the sloth's", "path"),
        ("The car drives past the old man's house", "The car drives, the old man's", "house"),
        ("A girl walks into the castle's courtyard", "A girl walks", "into the castle's courtyard"),
        # "as" with a bare subject and its verb opens a clause; a weather mass with a place of its own
        # before its verb is a thing, bare before its verb it stays weather
        (
            "A photo shows the mirror as steam from the kettle drifts toward it.",
            "the mirror as steam from the kettle drifts toward it.",
            "A photo shows",
        ),
        (
            "A slow shot of a window as fog in the harbour drifts against the glass.",
            "a window as fog, drifts against the glass.",
            "A slow shot, in the harbour",
        ),
        ("Mist rises from the lake at dawn.", "", "Mist rises from the lake at dawn."),
        ("The kite dances as if it were alive.", "The kite dances as if it were alive.", ""),
        # a noun that ends like an adjective is a noun; a drone the camera moves around is the subject
        # (a structure or a place stays the scene, as in VBench's labels); recording verbs hand their
        # object back like "captures"
        ("Table, pan left.", "Table", "pan left."),
        ("The camera orbits around. Drone, the camera circles around.", "Drone",
         "The camera orbits around. the camera circles around."),
        ("Lighthouse, the camera circles around.", "", "Lighthouse, the camera circles around."),
        ("A timelapse records the melting of a candle.", "the melting of a candle.", "A timelapse records"),
        # a plant and its verb are the subject of a prompt that names nothing else; a camera angle is
        # looked through like a view
        ("Trees sway gently in the breeze.", "Trees sway gently", "in the breeze."),
        ("a meadow of wildflowers.", "", "a meadow of wildflowers."),
        ("Trees sway in the breeze while a deer grazes", "a deer grazes", "Trees sway in the breeze"),
        ("low angle of a dog running", "a dog running", "low angle"),
    ],
)
def test_subjects_by_context(prompt: str, obj: str, bg: str) -> None:
    sp = split_prompt(prompt)
    assert (sp.object, sp.background) == (obj, bg)


def test_style_is_subset_of_background() -> None:
    sp = split_prompt("A stop sign. Realistic, Natural lighting, Casual")
    assert sp.object == "A stop sign."
    assert _has(sp.background, "natural lighting") and _has(sp.background, "realistic")
    assert sp.style == "Realistic"
    assert sp.style in sp.background


def test_style_prepositional_phrase() -> None:
    sp = split_prompt("A beautiful coastal beach in spring, waves lapping on sand, in the style of Ukiyo")
    assert sp.object == ""
    assert _has(sp.style, "in the style of Ukiyo")


def test_featuring_hands_subject_back_to_object() -> None:
    sp = split_prompt("A whimsical animated film, featuring a fluffy white sheep grazing in a lush green meadow")
    assert _has(sp.object, "sheep") and not _has(sp.background, "sheep")
    assert _has(sp.background, "meadow") and not _has(sp.object, "meadow")


def test_long_prompt_sentences() -> None:
    sp = split_prompt(
        "A stylish woman walks down a Tokyo street filled with warm glowing neon. She wears a black "
        "leather jacket and sunglasses. The street is damp and reflective, creating a mirror effect."
    )
    assert _has(sp.object, "woman") and _has(sp.object, "leather jacket")
    assert _has(sp.background, "Tokyo street") and _has(sp.background, "street is damp")
    assert not _has(sp.object, "street")


# ---- edge cases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "   ", "\n\t "])
def test_empty_input_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        split_prompt(bad)


def test_non_string_raises() -> None:
    with pytest.raises(TypeError):
        split_prompt(None)  # type: ignore[arg-type]


def test_punctuation_only_and_odd_input_do_not_crash() -> None:
    for text in ["...", "!!!", "4k", "日本の庭", "a", "in", "a, , , b"]:
        sp = split_prompt(text)
        assert isinstance(sp, PromptSplit)


def test_deterministic_and_frozen() -> None:
    p = "a corgi running on the beach at sunset, cinematic"
    assert split_prompt(p) == split_prompt(p)
    with pytest.raises(AttributeError):
        split_prompt(p).object = "x"  # type: ignore[misc]


def test_parts_are_slices_of_the_prompt() -> None:
    p = "A Fat Rabbit wearing a purple robe walking through a fantasy landscape"
    sp = split_prompt(p)
    assert sp.object in p and sp.background in p
    assert sp.background == "through a fantasy landscape"


def test_injected_lexicon_changes_result() -> None:
    """Without 'alley' in the lexicon a bare 'alley' is no longer recognised as a scene."""
    from flexcache.client.prompt_split import SCENE_WORDS

    sp = PromptSplitter(scene_words=SCENE_WORDS - {"alley"}).split("alley")
    assert sp.background == ""


def test_module_does_not_import_torch() -> None:
    import flexcache.client.prompt_split as mod

    assert "torch" not in mod.__dict__
    src = Path(mod.__file__).read_text()
    assert "import torch" not in src


# ---- accuracy floors on the real labels (fail if the splitter breaks) -----------------------------


def test_vbench_label_floors() -> None:
    b = _bench()
    labels = b.vbench_labels(DATA)
    suites = b.vbench_suites(DATA)
    orig = b.score(suites["VBench original (946)"], labels)
    assert orig.n_obj > 400 and orig.n_scene > 80
    assert orig.obj_recall() >= 0.95 and orig.obj_precision() >= 0.95
    assert orig.scene_recall() >= 0.90 and orig.scene_precision() >= 0.90
    hy = b.score(suites["VBench Hunyuan rewrite"], labels)
    assert hy.obj_recall() >= 0.90 and hy.scene_recall() >= 0.85
    longer = b.score(suites["VBench GPT 'longer'"], labels)
    assert longer.obj_recall() >= 0.50 and longer.obj_precision() >= 0.90
    assert longer.scene_recall() >= 0.65 and longer.scene_precision() >= 0.80


def test_heldout_vbench2_subject_floor() -> None:
    """VBench-2.0 subject-noun suite 1 (docs/prompt_split.md; both halves now development data):
    dev 1.000, test 1.000 when written (test was 0.979 before the coordinated-subject, -s verb +
    pronoun and possessive-place fixes)."""
    b = _bench()
    items = b.heldout_subjects(DATA)
    dev = b.score_subjects([it for it in items if it.half == "dev"])
    test = b.score_subjects([it for it in items if it.half == "test"])
    assert dev.present >= 220 and test.present >= 220
    assert dev.rate() >= 0.99
    assert test.rate() >= 0.99
    # the metric must fail a splitter that puts everything in the background
    broken = b.score_subjects(items[:50], lambda t: PromptSplit(object="", background=t))
    assert broken.rate() == 0.0 and broken.bg_only == broken.present


def test_suite2_subject_floor() -> None:
    """Suite 2 (Thermotics, Motion_Rationality, Motion_Order_Understanding): 0.970 (194 / 200) held
    out, before and after the suite-1 fixes; its six misses (steam, mist, fog in "as" clauses) were
    then fixed, so it is development data now (1.000)."""
    b = _bench()
    items = b.labelled_subjects(DATA, b.SUITE2_LABELS)
    s = b.score_subjects(items)
    assert s.present >= 195
    assert s.rate() >= 0.99
    broken = b.score_subjects(items, lambda t: PromptSplit(object="", background=t))
    assert broken.rate() == 0.0


def test_suite3_and_4_subject_floors() -> None:
    """Suites 3 (Mechanics, Material, Multi-View_Consistency, Camera_Motion) and 4 (VBench competition
    prompts, trustworthiness rows, Complex_Plot, Diversity) were held out until measured once (0.842
    and 0.908 as labelled; docs/prompt_split.md), then their misses were read and fixed where they
    generalise, so both are development data now (0.992 and 0.967 with the labels VBench calls
    scenes set apart). The floors sit a little below."""
    b = _bench()
    scene = b.vbench_scene_nouns(DATA)
    s3 = b.score_subjects(b.labelled_subjects(DATA, b.SUITE3_LABELS), scene_nouns=scene)
    s4 = b.score_subjects(b.labelled_subjects(DATA, b.SUITE4_LABELS), scene_nouns=scene)
    assert (s3.present, s3.scene) == (254, 5) and (s4.present, s4.scene) == (212, 16)
    assert s3.rate() >= 0.98
    assert s4.rate() >= 0.96


def test_suite5_subject_floor() -> None:
    """Suite 5 (304 FETV captions, labelled under VBench's taxonomy before the splitter saw them):
    0.881 at its one measurement (0.878 with the splitter before suites 3-5); its misses were then
    read, and two kinds fixed (a plant as the only subject, "angle of"): 0.893 as development data.
    The floor sits a little below."""
    b = _bench()
    s = b.score_subjects(b.labelled_subjects(DATA, b.SUITE5_LABELS), scene_nouns=b.vbench_scene_nouns(DATA))
    assert s.present == 336 and s.scene == 0
    assert s.rate() >= 0.88


def test_metric_detects_a_broken_splitter() -> None:
    """The metric itself must fail a splitter that puts everything in the object."""
    b = _bench()
    labels = b.vbench_labels(DATA)
    prompts = b.vbench_suites(DATA)["VBench original (946)"]
    s = b.score(prompts, labels, lambda t: PromptSplit(object=t, background=""))
    assert s.scene_recall() == 0.0
    assert s.obj_precision() < 0.85


# ---- speed --------------------------------------------------------------------------------------------


def _timing_prompts() -> list[str]:
    short = (DATA / "vbench/prompts/all_dimension.txt").read_text().splitlines()[:300]
    long = (
        (DATA / "vbench/prompts/augmented_prompts/gpt_enhanced_prompts/all_dimension_longer.txt")
        .read_text()
        .splitlines()[:100]
    )
    return [p for p in short + long if p.strip()]


def test_average_latency_loose() -> None:
    prompts = _timing_prompts()
    assert len(prompts) >= 300
    split_prompt(prompts[0])  # warm
    t0 = time.perf_counter()
    for p in prompts:
        split_prompt(p)
    avg_ms = (time.perf_counter() - t0) / len(prompts) * 1e3
    assert avg_ms < 5.0, f"average {avg_ms:.3f} ms per prompt"


def test_reference_world_captions_split_into_both_parts() -> None:
    """The serving benchmark's decoupled lookup needs both parts of the reference model's prompts."""
    import numpy as np

    from flexcache_model.reference import world

    rng = np.random.default_rng(5)
    captions = [world.caption(world.random_spec(rng), rng) for _ in range(500)]
    both = [c for c in captions if (s := split_prompt(c)).object and s.background]
    assert len(both) >= 0.97 * len(captions)
    assert split_prompt("a checkered yellow background with a large red square swelling") == PromptSplit(
        object="a large red square swelling", background="a checkered yellow background")


def test_suite6_subject_floor() -> None:
    """Suite 6 (136 Open-Sora prompts, many a paragraph long, labelled under VBench's taxonomy before the
    splitter saw them): 0.783 at its one measurement; most misses are subjects named again in the
    prompt's background sentences ("the focus is on the woman"). Two kinds were then fixed ("animation
    of X", "..., following several people"): 0.799 as development data. The floor sits a little below."""
    b = _bench()
    s = b.score_subjects(b.labelled_subjects(DATA, b.SUITE6_LABELS), scene_nouns=b.vbench_scene_nouns(DATA))
    assert s.present == 184 and s.scene == 0
    assert s.rate() >= 0.79
