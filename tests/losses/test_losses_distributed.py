"""Gradient statistics across workers: two gloo processes, each with half of every batch,
must end with identical buffers equal to one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist

from helpers import run_on_gloo_workers
from eql_d2.losses import EQLv2Loss, EqualizedFocalLoss, EqualizedQualityFocalLoss

C = 7
N = 64
STEPS = 3


def _batches():
    """The global batches of every step: logits, labels, quality, objectness logits."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        logits = torch.randn(N, C, generator=g) * 3 - 1
        labels = torch.randint(0, C, (N,), generator=g)
        labels[torch.rand(N, generator=g) < 0.5] = C
        ignore = torch.rand(N, generator=g) < 0.1
        quality = torch.rand(N, generator=g)
        objectness = torch.randn(N, 1, generator=g)
        out.append((logits, labels, ignore, quality, objectness))
    return out


def _run(rows, avg_factor=11.0):
    """Train the three stateful losses for STEPS steps on ``rows`` of each global batch.

    ``avg_factor``: of EFL / EQFL; a worker holding 1 / world_size of the batch passes the
    whole batch's divided by world_size, as the dense detectors' avg_factor averaged over
    workers is."""
    losses = {"eqlv2": EQLv2Loss(C), "efl": EqualizedFocalLoss(C),
              "eqfl": EqualizedQualityFocalLoss(C, scale=4.0)}
    for logits, labels, ignore, quality, objectness in _batches():
        focal_labels = torch.where(ignore, -1, labels)
        z = logits[rows].clone().requires_grad_()
        zo = torch.cat([logits, objectness], 1)[rows].clone().requires_grad_()
        losses["eqlv2"](zo, labels[rows]).backward()
        losses["efl"](z, focal_labels[rows], avg_factor).backward()
        losses["eqfl"](z, focal_labels[rows], quality[rows], avg_factor).backward()
    return {name: torch.stack([m.pos_grad, m.neg_grad]) for name, m in losses.items()}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_gloo_workers_match_one_process_on_the_whole_batch():
    ranks = run_on_gloo_workers(_run, N, avg_factor=11.0 / 2)
    single = _run(slice(0, N))
    for name, expected in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert (expected > 0).any()
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")
    # Without the all_reduce, each worker would see only its half: make sure the halves
    # alone really differ from the whole, so the comparison above has teeth.
    local = _run(slice(0, N // 2))
    assert not torch.allclose(local["efl"], single["efl"], rtol=1e-3)
