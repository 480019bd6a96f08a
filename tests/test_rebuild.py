"""rebuild_for(pipeline): the client's Rebuild is the model's forward process with the sampler's own eps.

Observed with the flow checkpoint (one prompt, N = 10 and 50 steps): the rebuilt x_K from the true
x0 is 0.06 (K=1 of 10) to 0.20 (K=5 of 10; 0.19 at K=21-25 of 50) relative L2 away from the true
trajectory latent x_K -- the learned trajectory is not straight -- while the same rebuild with a
wrong seed is 1.07-1.43 away. The bounds below (0.35 vs 0.8) sit between the two.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flexcache_model.reference import checkpoint
from flexcache_model.reference.rebuild import ForwardRebuild, rebuild_for
from flexcache_model.reference.schedulers import DDIMScheduler, FlowMatchScheduler, initial_noise

PROMPT = "a small red square drifting left over blue stripes"
SEED = 7
N = 10

needs_flow = pytest.mark.skipif(not (checkpoint.CHECKPOINT_DIR / "denoiser_flow.json").exists(),
                                reason="flow checkpoint not trained")


def rel(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def flow():
    torch.set_num_threads(1)
    from flexcache_model.reference.pipeline import load_pipeline

    pipe = load_pipeline("flow")
    x0, traj = pipe.sample(PROMPT, SEED, steps=N, return_trajectory=True)
    return pipe, x0, traj


@needs_flow
def test_rebuild_equals_add_noise_and_ends_of_the_trajectory(flow) -> None:
    pipe, x0, traj = flow
    rb = rebuild_for(pipe)
    eps = pipe.initial_noise(SEED)
    for k in range(N + 1):
        expected = pipe.add_noise(x0, eps, k, steps=N)
        got = rb(x0, SEED, k, N)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert torch.equal(got, expected)
    assert torch.equal(rb(x0, SEED, 0, N), traj[0])  # index 0 is exactly the sampler's eps
    assert torch.equal(rb(x0, SEED, N, N), x0)


@needs_flow
def test_numpy_in_numpy_out(flow) -> None:
    pipe, x0, _ = flow
    rb = rebuild_for(pipe)
    a = x0.numpy()
    out = rb(a, SEED, 3, N)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == a.shape
    np.testing.assert_array_equal(out, rb(x0, SEED, 3, N).numpy())
    half = rb(a.astype(np.float16), SEED, 3, N)  # a decoded fp16 latent is widened, not rejected
    assert half.dtype == np.float32
    assert rel(half, out) < 1e-3


@needs_flow
def test_rebuild_is_close_to_the_true_trajectory_and_far_with_a_wrong_seed(flow) -> None:
    pipe, x0, traj = flow
    rb = rebuild_for(pipe)
    for k in range(1, N // 2 + 1):  # K up to half of the steps, NIRVANA's range (5..25 of 50)
        right = rel(rb(x0, SEED, k, N), traj[k])
        wrong_seed = rel(rb(x0, SEED + 1, k, N), traj[k])
        assert right < 0.35, (k, right)
        assert wrong_seed > 0.8 and wrong_seed > 3 * right, (k, right, wrong_seed)
    # the index matters too: at K=1 of 10 the neighbouring indices are clearly farther away
    right = rel(rb(x0, SEED, 1, N), traj[1])
    assert right < 0.75 * min(rel(rb(x0, SEED, 0, N), traj[1]), rel(rb(x0, SEED, 2, N), traj[1]))


def test_ddpm_forward_process_without_a_checkpoint() -> None:
    sched = DDIMScheduler("v")
    rb = rebuild_for(SimpleNamespace(scheduler=sched))  # only the scheduler is used
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = initial_noise(11, x0.shape)
    for k in (0, 5, 25, 50):
        assert torch.equal(rb(x0, 11, k, 50), sched.add_noise(x0, eps, k, steps=50))
    a = sched.abar(10, 50)
    np.testing.assert_allclose(rb(x0.numpy(), 11, 10, 50), (a ** 0.5 * x0 + (1 - a) ** 0.5 * eps).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_bad_step_is_rejected() -> None:
    rb = ForwardRebuild(FlowMatchScheduler())
    x0 = np.zeros((2, 3), np.float32)
    for k, n in ((-1, 50), (51, 50), (0, 0)):
        with pytest.raises(ValueError):
            rb(x0, 1, k, n)


@needs_flow
def test_client_get_rebuilds_with_the_model(daemon) -> None:
    """End to end: store the true x0 + seed, get() a rebuilt x_25 close to the true trajectory's."""
    from flexcache.client import CacheClient
    from flexcache_model.reference.pipeline import load_pipeline
    from tests.conftest import NS
    from tests.vectors import unit

    torch.set_num_threads(1)
    pipe = load_pipeline("flow")
    x0, traj = pipe.sample(PROMPT, SEED, steps=NS.total_steps, return_trajectory=True)
    rb = rebuild_for(pipe)
    with CacheClient(daemon.target, NS, max_rel_error=0.01, timeout_s=5) as c:
        c.put(PROMPT, x0, unit(3), seed=SEED)
        hit = c.get(unit(3), rebuild=rb, as_torch=True)
    assert hit is not None and hit.steps == 25
    assert isinstance(hit.latent, torch.Tensor)
    assert rel(hit.latent, rb(x0, SEED, 25, NS.total_steps)) < 0.01  # codec budget, attenuated by 1 - sigma
    assert rel(hit.latent, traj[25]) < 0.35
