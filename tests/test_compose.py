"""Composition of an object donor and a background donor: placement, feathering, and end to end."""

from __future__ import annotations

import numpy as np
import pytest

from flexcache.client.compose import compose, feathered, one_part, pair_score, placement, shift
from tests.conftest import connect
from tests.vectors import at_similarity, unit

GRID = (3, 12, 16)  # T, H, W


def box(rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros(GRID, bool)
    m[:, rows, cols] = True
    return m


def test_feathered_keeps_the_object_whole_and_softens_outside() -> None:
    m = feathered(box(slice(4, 8), slice(4, 8)), feather=1)
    assert (m[:, 4:8, 4:8] == 1).all() and (m[:, :2] == 0).all()
    assert 0 < m[0, 3, 5] < 1 and 0 < m[0, 8, 5] < 1
    np.testing.assert_array_equal(feathered(box(slice(4, 8), slice(4, 8)), 0), box(slice(4, 8), slice(4, 8)))


def test_shift_moves_content() -> None:
    a = box(slice(2, 4), slice(2, 4)).astype(np.int8)
    moved = shift(a, (3, -2))
    np.testing.assert_array_equal(moved, box(slice(5, 7), slice(0, 2)).astype(np.int8))


def test_placement_aligns_objects_that_do_not_overlap() -> None:
    obj, bg = box(slice(1, 3), slice(1, 3)), box(slice(8, 10), slice(10, 12))
    place = placement(obj, bg)
    assert place.iou == 0 and place.shift == (7, 9)
    assert placement(obj, obj).shift == (0, 0)  # already in place
    assert placement(obj, None).shift == (0, 0)  # nothing to align to


def test_compose_takes_object_inside_and_background_outside() -> None:
    c = 4
    obj_latent = np.full((c, *GRID), 1.0, np.float32)
    bg_latent = np.full((c, *GRID), -1.0, np.float32)
    mask = box(slice(4, 8), slice(4, 8))
    out, place = compose(obj_latent, bg_latent, mask, mask.copy(), feather=1)
    assert place.shift == (0, 0) and out.shape == obj_latent.shape
    assert (out[:, :, 4:8, 4:8] == 1).all() and (out[:, :, 0, :] == -1).all()
    assert ((out > -1) & (out < 1)).any()  # a feathered seam
    with pytest.raises(ValueError, match="differ in shape"):
        compose(obj_latent, bg_latent[:2], mask)


def test_pair_score_prefers_overlap_and_needs_an_object_mask() -> None:
    a, b = box(slice(4, 8), slice(4, 8)), box(slice(0, 2), slice(0, 2))
    assert pair_score(0.9, 0.9, a, a) > pair_score(0.9, 0.9, a, b)
    assert pair_score(0.9, 0.9, None, a) is None
    assert pair_score(0.9, 0.9, a, np.zeros((1, 2, 2), bool)) is None


def test_composed_hit_end_to_end(daemon) -> None:
    """"a dog on a beach": the dog of one entry, the beach of another."""
    dog, forest, cat, beach = unit(1), unit(2), unit(3), unit(4)
    shape = (4, *GRID)
    dog_latent, beach_latent = np.full(shape, 2.0, np.float32), np.full(shape, -2.0, np.float32)
    dog_mask, cat_mask = box(slice(3, 7), slice(3, 7)), box(slice(4, 8), slice(8, 12))
    with connect(daemon.target) as c:
        c.put("a dog in a forest", dog_latent, unit(10), object_vector=dog, background_vector=forest,
              object_mask=dog_mask, seed=1)
        c.put("a cat on a beach", beach_latent, unit(11), object_vector=cat, background_vector=beach,
              object_mask=cat_mask, seed=2)
        seen = []

        def rebuild(x0, seed, k, n):
            seen.append((seed, k, n))
            return x0

        hit = c.get(unit(12), object_vector=at_similarity(dog, 0.96, 100),
                    background_vector=at_similarity(beach, 0.92, 101), rebuild=rebuild)
        assert hit is not None and hit.kind == "composed" and hit.steps == 5  # the daemon's composed cap: 10 %
        assert [s.prompt for s in hit.sources] == ["a dog in a forest", "a cat on a beach"]
        assert sorted(seen) == [(1, 5, 50), (2, 5, 50)]  # each donor rebuilt at the composite's step
        # The dog was moved onto the cat's place, covering it; the rest is beach.
        assert (hit.latent[:, :, 4:8, 8:12] == 2.0).all()
        assert (hit.latent[:, :, :2, :2] == -2.0).all()
        stats = c.stats()
        assert stats.entries == 2
        # Without the parts' vectors the same request is a plain miss.
        assert c.get(unit(12)) is None


def test_one_part_keeps_the_matched_part_and_flattens_the_other() -> None:
    mask = box(slice(4, 8), slice(4, 8))
    latent = np.where(mask[None], 5.0, 0.0).astype(np.float32).repeat(2, axis=0)
    latent[1, :, 0, 0] = 12.0  # background detail: the flattened part keeps only the background mean
    mean_bg = 12.0 / (GRID[1] * GRID[2] - 16)
    obj = one_part(latent, mask, "object", feather=0)
    assert (obj[:, :, 4:8, 4:8] == 5.0).all() and obj[1, 0, 0, 0] == pytest.approx(mean_bg)
    bg = one_part(latent, mask, "background", feather=0)
    assert bg[1, 0, 0, 0] == 12.0 and bg[0, :, 4:8, 4:8] == pytest.approx(0.0)  # the donor's object is gone
    assert bg[1, :, 4:8, 4:8] == pytest.approx(mean_bg)
    assert obj.dtype == latent.dtype and obj.shape == latent.shape
    with pytest.raises(ValueError, match="keep must be"):
        one_part(latent, mask, "scene")
    with pytest.raises(ValueError, match="does not match"):
        one_part(latent, mask[:, :4], "object")


def test_partial_hit_end_to_end(daemon) -> None:
    """Only the background matches: a partial hit when the client allows it, a miss otherwise."""
    beach, dog_mask = unit(4), box(slice(3, 7), slice(3, 7))
    latent = np.where(dog_mask[None], 3.0, -1.0).astype(np.float32).repeat(4, axis=0)
    with connect(daemon.target) as c:
        c.put("a dog on a beach", latent, unit(10), object_vector=unit(1), background_vector=beach,
              object_mask=dog_mask, seed=7)
        query = dict(object_vector=unit(3), background_vector=at_similarity(beach, 0.9, 100))
        assert c.get(unit(12), **query) is None  # a cat on a beach: no object donor, no composite
        result = c.lookup(unit(12), **query, partial_roles=("background",))
        assert [(d.role, d.granted_steps) for d in result.candidates] == [("background", 5)]  # composed cap
        assert c.get(unit(12), **query, partial_roles=("object",)) is None  # the object did not match
        hit = c.get(unit(12), **query, partial_roles=("background",), rebuild=lambda x0, seed, k, n: x0 + seed)
        assert hit is not None and hit.kind == "partial" and hit.steps == 5
        assert hit.sources[0].prompt == "a dog on a beach"
        np.testing.assert_allclose(hit.latent, np.full(latent.shape, -1.0 + 7))  # the dog erased, then rebuilt
        # Only the object matches: the dog is kept, the beach flattened (here: already flat).
        hit = c.get(unit(12), object_vector=at_similarity(unit(1), 0.97, 101), background_vector=unit(5),
                    partial_roles=("object",))
        assert hit.kind == "partial" and hit.sources[0].role == "object"
        np.testing.assert_array_equal(hit.latent, latent)
