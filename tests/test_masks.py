"""Object masks: pooling pixel masks onto the latent grid, and estimating masks from latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexcache.client.masks import estimate_object_mask, iou, pool_mask
from flexcache_model.reference import world
from flexcache_model.reference.pipeline import load_pipeline
from tests.conftest import connect
from tests.vectors import unit


def test_pool_mask() -> None:
    pixels = np.zeros((8, 32, 32), bool)
    pixels[:, 4:8, 4:6] = True  # half of one 4x4 cell on each of two cells' rows
    pooled = pool_mask(pixels, (4, 8, 8))
    assert pooled.shape == (4, 8, 8) and pooled[:, 1, 1].all() and pooled.sum() == 4
    assert not pool_mask(pixels, (4, 8, 8), min_fraction=0.75).any()
    with pytest.raises(ValueError):
        pool_mask(pixels, (3, 8, 8))


def test_estimates_a_moving_blob() -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(0, 0.05, (4, 6, 16, 16)).astype(np.float32) + rng.normal(0, 1, (4, 1, 1, 1))
    truth = np.zeros((6, 16, 16), bool)
    for t in range(6):
        truth[t, 5:9, 2 + 2 * t:6 + 2 * t] = True
    latent[:, truth] += 2.0
    assert iou(estimate_object_mask(latent), truth) > 0.8
    assert not estimate_object_mask(np.zeros((4, 6, 16, 16), np.float32)).any()
    with pytest.raises(ValueError):
        estimate_object_mask(np.zeros((6, 16, 16)))


def test_beats_a_fixed_prior_on_the_reference_world() -> None:
    """Held-out clips (the estimator's weights were chosen on seed 123)."""
    torch.set_num_threads(2)
    pipe = load_pipeline("flow")
    _, _, videos, masks = world.sample_dataset(48, seed=11)
    latents = pipe.encode(torch.from_numpy(videos).float() / 255).numpy()
    grid = latents.shape[2:]
    centre = np.zeros(grid, bool)
    centre[:, 2:6, 2:6] = True
    estimated = np.mean([iou(estimate_object_mask(z), pool_mask(m, grid)) for z, m in zip(latents, masks, strict=True)])
    prior = np.mean([iou(centre, pool_mask(m, grid)) for m in masks])
    assert estimated > 0.4 and estimated > prior + 0.1


def test_client_estimates_a_mask_for_donor_entries(daemon) -> None:
    latent = np.zeros((4, 4, 8, 8), np.float32)
    latent[:, :, 2:4, 3:5] = 3.0
    with connect(daemon.target) as c:
        c.put("a donor", latent, unit(1), object_vector=unit(2), background_vector=unit(3))
        result = c.lookup(unit(4), object_vector=unit(2), background_vector=unit(3))
        (obj,) = result.donors("object")
        expected = np.zeros((4, 8, 8), bool)
        expected[:, 2:4, 3:5] = True
        np.testing.assert_array_equal(obj.object_mask, expected)
        c.put("no parts", latent, unit(5))  # no object vector: nothing to place, no mask
        assert c.lookup(unit(5)).best.object_mask is None
