"""One call convention: every loss returns its sum divided by ``avg_factor``; None divides by
the number of rows N."""

import pytest
import torch

from eql_d2.losses import (EQLLoss, EQLv2Loss, EqualizedFocalLoss, EqualizedQualityFocalLoss,
                           FederatedLoss, FocalLoss, QualityFocalLoss, SeesawLoss, SigmoidCELoss,
                           SoftmaxCELoss, SoftmaxEQLLoss)

pytestmark = pytest.mark.usefixtures("one_thread")

C, N = 6, 40


def _stateful(loss_fn):
    loss_fn.neg_grad.fill_(10.0)
    loss_fn.pos_grad.copy_(torch.linspace(0.5, 15.0, C))
    return loss_fn.train()


def _cases():
    """name -> (build a fresh loss, logits, inputs before avg_factor). A fresh loss per call
    keeps stateful losses (statistics, Seesaw's counts, random draws) comparable."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, C + 2, generator=g) * 3 - 1
    labels = torch.randint(0, C, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.5] = C
    ignore = labels.clone()
    ignore[torch.rand(N, generator=g) < 0.1] = -1
    verified = torch.rand(N, C, generator=g) < 0.3
    quality = torch.rand(N, generator=g)
    freq = torch.linspace(1e-4, 0.2, C)
    counts = torch.arange(1.0, C + 1)

    def seeded():
        return torch.Generator().manual_seed(5)

    return {
        "SigmoidCE": (SigmoidCELoss, z[:, :C], (labels,)),
        "SoftmaxCE": (SoftmaxCELoss, z[:, :C + 1], (labels,)),
        "EQL": (lambda: EQLLoss(freq, lambda_=0.05), z[:, :C], (labels, verified)),
        "EQLv2": (lambda: _stateful(EQLv2Loss(C)), z[:, :C + 1], (labels, verified)),
        "EQLv2 no verified": (lambda: _stateful(EQLv2Loss(C)), z[:, :C + 1], (labels, None)),
        "Seesaw": (lambda: SeesawLoss(C).train(), z, (labels,)),
        "Federated": (lambda: FederatedLoss(C, counts, num_classes_sampled=3,
                                            generator=seeded()), z[:, :C + 1], (labels,)),
        "SoftmaxEQL": (lambda: SoftmaxEQLLoss(freq, lambda_=0.05, gamma=0.9,
                                              generator=seeded()), z[:, :C], (labels % C,)),
        "Focal": (FocalLoss, z[:, :C], (ignore,)),
        "QFL": (QualityFocalLoss, z[:, :C], (ignore, quality)),
        "EFL": (lambda: _stateful(EqualizedFocalLoss(C)), z[:, :C], (ignore,)),
        "EQFL": (lambda: _stateful(EqualizedQualityFocalLoss(C)), z[:, :C], (ignore, quality)),
    }


def _run(name, *avg_factor):
    build, z, inputs = _cases()[name]
    loss_fn = build()
    before = [loss_fn.pos_grad.clone(), loss_fn.neg_grad.clone()] \
        if hasattr(loss_fn, "pos_grad") else []
    x = z.detach().clone().requires_grad_()
    loss = loss_fn(x, *inputs, *avg_factor)
    loss.backward()
    step = [loss_fn.pos_grad - before[0], loss_fn.neg_grad - before[1]] if before else []
    return loss.detach(), x.grad, step


def _close(a, b, rtol=1e-6):
    assert (a - b).abs().max() <= rtol * b.abs().max(), (a, b)


@pytest.mark.parametrize("name", list(_cases()))
def test_loss_is_sum_over_avg_factor(name):
    k = 7.5
    one, grad_one, stats_one = _run(name, 1.0)
    scaled, grad_scaled, stats_scaled = _run(name, k)
    _close(scaled * k, one)
    _close(grad_scaled * k, grad_one)
    for a, b in zip(stats_scaled, stats_one):
        # EFL and EQFL count the gradient they send (1 / avg_factor included); EQLv2 counts
        # |w dBCE/dz|, which does not depend on it. (A step is the difference of float32
        # buffers holding earlier statistics: a few ulps of those.)
        _close(a * k if name.startswith(("EFL", "EQFL")) else a, b, rtol=1e-5)
    build, z, inputs = _cases()[name]
    assert torch.equal(build()(z, *inputs, avg_factor=k), scaled)  # same by keyword


@pytest.mark.parametrize("name", list(_cases()))
def test_no_avg_factor_means_the_number_of_rows(name):
    default = _run(name)
    for avg_factor in (float(N), N, torch.tensor(float(N))):
        given = _run(name, avg_factor)
        for a, b in zip([default[0], default[1], *default[2]], [given[0], given[1], *given[2]]):
            assert torch.equal(a, b), name
