"""Tests of eql_d2.losses against the papers' formulas (issue 3).

The references below are written independently of the library, the way the published
implementations are: plain autograd over the formula, statistics from a backward hook.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from eql_d2.losses import (EQLLoss, EQLv2Loss, EqualizedFocalLoss, EqualizedQualityFocalLoss,
                           FocalLoss, QualityFocalLoss, SigmoidCELoss, SoftmaxCELoss,
                           SoftmaxEQLLoss, tail_ratio)

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_close(a, b, rtol=1e-5, atol=0.0):
    """|a - b| <= rtol * max|b| + atol, elementwise over the whole tensor's scale."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    assert err <= rtol * scale + atol, f"max abs err {err:.3e} vs scale {scale:.3e}"


def onehot(labels, width):
    """[N, width] float64 targets; labels >= width or < 0 give an all-zero row."""
    cls = torch.arange(width)
    return (labels[:, None] == cls).to(torch.float64)


def make_batch(n, c, *, seed, ignore=False, bg_frac=0.5, scale=3.0, dtype=torch.float32,
               objectness=False):
    """logits [N, C] (or [N, C+1] with ``objectness``), labels [N] in 0..C (-1 if ignore)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c + objectness, generator=g) * scale - 1.0).to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[torch.rand(n, generator=g) < bg_frac] = c
    if ignore:
        labels[torch.rand(n, generator=g) < 0.15] = -1
    return logits, labels


# ----------------------------------------------------------------------------------------
# References (float64, autograd, statistics from a hook on the logits)


class RefEQLv2:
    def __init__(self, c, gamma=12.0, mu=0.8, alpha=4.0):
        self.c, self.gamma, self.mu, self.alpha = c, gamma, mu, alpha
        self.pos = torch.zeros(c, dtype=torch.float64)
        self.neg = torch.zeros(c, dtype=torch.float64)

    def weights(self):
        g = self.pos / self.neg
        q = torch.where(self.neg > 0, 1 / (1 + torch.exp(-self.gamma * (g - self.mu))),
                        torch.ones_like(g))
        return q, 1 + self.alpha * (1 - q)

    def __call__(self, z, labels, verified=None, train=True):
        n, c = z.shape[0], self.c
        y = onehot(labels, c + 1)
        q, r = self.weights()
        neg_w = q.expand(n, c).clone()
        if verified is not None:
            neg_w[verified] = 1.0
        w = torch.ones(n, c + 1, dtype=torch.float64)
        w[:, :c] = y[:, :c] * r + (1 - y[:, :c]) * neg_w
        loss = (w * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() / n
        if train:
            def hook(grad):
                ag = (grad * n).abs()[:, :c]
                self.pos += (ag * y[:, :c]).sum(0)
                self.neg += (ag * (1 - y[:, :c])).sum(0)
            z.register_hook(hook)
        return loss


class RefEFL:
    """EFL (eq. 3-4) or, with quality, EQFL (eq. 5); statistics = |dL/dz| from a hook."""

    def __init__(self, c, gamma_b=2.0, scale=8.0, alpha=0.25):
        self.c, self.gamma_b, self.scale, self.alpha = c, gamma_b, scale, alpha
        self.pos = torch.zeros(c, dtype=torch.float64)
        self.neg = torch.zeros(c, dtype=torch.float64)

    def gamma(self):
        g = torch.where(self.neg > 0, self.pos / self.neg, torch.ones_like(self.pos))
        return self.gamma_b + self.scale * (1 - g.clamp(0, 1))

    def __call__(self, z, labels, avg_factor, quality=None, train=True):
        valid = (labels >= 0).to(torch.float64)[:, None]
        y = onehot(labels, self.c)
        gam = self.gamma()
        p = torch.sigmoid(z)
        if quality is None:
            pt = p * y + (1 - p) * (1 - y)
            at = self.alpha * y + (1 - self.alpha) * (1 - y) if self.alpha is not None else 1.0
            el = -at * (gam / self.gamma_b) * (1 - pt) ** gam * torch.log(pt)
        else:
            t = y * quality[:, None]
            el = -(gam / self.gamma_b) * (t - p).abs() ** gam * (
                t * torch.log(p) + (1 - t) * torch.log(1 - p))
        loss = (el * valid).sum() / avg_factor
        if train:
            def hook(grad):
                ag = grad.abs() * valid
                self.pos += (ag * y).sum(0)
                self.neg += (ag * (1 - y)).sum(0)
            z.register_hook(hook)
        return loss


def run_step(loss_fn, logits, *args):
    z = logits.detach().clone().requires_grad_()
    loss = loss_fn(z, *args)
    loss.backward()
    return loss.detach(), z.grad


# ----------------------------------------------------------------------------------------
# Reductions to the baselines


def test_eql_lambda_zero_is_sigmoid_ce():
    logits, labels = make_batch(64, 7, seed=0)
    freq = torch.tensor([0.5, 1e-4, 1e-3, 0.2, 0.0, 0.03, 0.9])
    loss, grad = run_step(EQLLoss(freq, lambda_=0.0), logits, labels)
    z = logits.double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(z, onehot(labels, 7), reduction="sum") / 64
    ref.backward()
    rel_close(loss, ref.detach(), 1e-6)
    rel_close(grad, z.grad, 1e-6)
    base_loss, base_grad = run_step(SigmoidCELoss(), logits, labels)
    # the same gradient; the loss sums its logs in another order (products of columns)
    rel_close(loss, base_loss, 1e-6)
    assert torch.equal(grad, base_grad)
    # In float64 the two computations agree to rounding.
    loss64, _ = run_step(EQLLoss(freq, lambda_=0.0), logits.double(), labels)
    assert abs(loss64.item() - ref.item()) <= 1e-13 * ref.item()


def test_eqlv2_first_step_is_sigmoid_ce():
    logits, labels = make_batch(50, 5, seed=1, objectness=True)
    loss_fn = EQLv2Loss(5).train()
    loss, grad = run_step(loss_fn, logits.double(), labels)
    z = logits.double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(z, onehot(labels, 6), reduction="sum") / 50
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-13 * ref.item()
    rel_close(grad, z.grad, 1e-12)
    assert (loss_fn.neg_grad > 0).all()  # statistics were collected for the next step


def test_efl_scale_zero_and_first_step_are_focal_loss():
    from torchvision.ops import sigmoid_focal_loss

    logits, labels = make_batch(80, 9, seed=2, ignore=True)
    keep = labels >= 0
    z = logits.double().requires_grad_()
    ref = sigmoid_focal_loss(z[keep], onehot(labels[keep], 9), alpha=0.25, gamma=2.0,
                             reduction="sum") / 7.0
    ref.backward()
    for loss_fn in (EqualizedFocalLoss(9, scale=0.0), EqualizedFocalLoss(9, scale=8.0),
                    FocalLoss(gamma=2.0, alpha=0.25)):
        loss, grad = run_step(loss_fn, logits.double(), labels, 7.0)
        assert abs(loss.item() - ref.item()) <= 1e-12 * ref.item()
        rel_close(grad, z.grad, 1e-12)
    # Same in float32 against torchvision in float32, and alpha disabled.
    ref32 = sigmoid_focal_loss(logits[keep], onehot(labels[keep], 9).float(), alpha=-1,
                               gamma=1.5, reduction="sum") / 3.0
    loss32, _ = run_step(FocalLoss(gamma=1.5, alpha=None), logits, labels, torch.tensor(3.0))
    rel_close(loss32, ref32, 1e-6)


def test_eqfl_scale_zero_is_quality_focal_loss():
    logits, labels = make_batch(60, 5, seed=3, ignore=True)
    quality = torch.rand(60, generator=torch.Generator().manual_seed(3)).double()
    keep = labels >= 0
    z = logits.double().requires_grad_()
    # QFL (Li et al. 2020): -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log sigma)
    t = onehot(labels, 5) * quality[:, None]
    s = torch.sigmoid(z)
    qfl = -(t - s).abs() ** 2.0 * ((1 - t) * torch.log(1 - s) + t * torch.log(s))
    ref = qfl[keep].sum() / 4.0
    ref.backward()
    for loss_fn in (EqualizedQualityFocalLoss(5, scale=0.0), EqualizedQualityFocalLoss(5),
                    QualityFocalLoss(beta=2.0)):
        loss, grad = run_step(loss_fn, logits.double(), labels, quality, 4.0)
        assert abs(loss.item() - ref.item()) <= 1e-12 * ref.item()
        rel_close(grad, z.grad, 1e-10)


def test_seql_gamma_zero_is_softmax_ce_exactly():
    logits, labels = make_batch(40, 6, seed=4, bg_frac=0.0)
    freq = torch.tensor([0.5, 1e-4, 1e-3, 0.2, 1e-5, 0.03])
    z1 = logits.clone().requires_grad_()
    loss = SoftmaxEQLLoss(freq, lambda_=1e-2, gamma=0.0)(z1, labels)
    loss.backward()
    z2 = logits.clone().requires_grad_()
    ref = F.cross_entropy(z2, labels)
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(z1.grad, z2.grad)
    assert torch.equal(SoftmaxCELoss()(logits, labels), ref.detach())


# ----------------------------------------------------------------------------------------
# EQL weights and tail ratio on hand-built cases


def test_eql_weights_follow_eq7_and_verified():
    # classes 0..3, frequencies: 0 and 3 frequent, 1 and 2 tail for lambda = 1.76e-3
    freq = torch.tensor([0.3, 1e-4, 1e-3, 0.01])
    labels = torch.tensor([0, 4, 1, 3])  # fg, background, tail fg, fg
    verified = torch.zeros(4, 4, dtype=torch.bool)
    verified[0, 2] = True  # class 2 is in sample 0's image-level label sets
    expected = torch.tensor([
        [1.0, 0.0, 1.0, 1.0],  # class 1 ignored; class 2 kept because verified
        [1.0, 1.0, 1.0, 1.0],  # background: E(r) = 0
        [1.0, 1.0, 0.0, 1.0],  # its own tail class is a positive: weight 1
        [1.0, 0.0, 0.0, 1.0],
    ])
    loss_fn = EQLLoss(freq)
    assert loss_fn.threshold().tolist() == [False, True, True, False]
    # At z = 0: BCE = log 2 and dL/dz = w (1/2 - y) / N, so w = 2 N |grad|.
    loss, grad = run_step(loss_fn, torch.zeros(4, 4, dtype=torch.float64), labels, verified)
    assert torch.allclose(grad.abs() * 8, expected.double(), atol=1e-15)
    assert math.isclose(loss.item(), math.log(2) * expected.sum().item() / 4, rel_tol=1e-14)
    # Without verified, sample 0 ignores class 2 as well.
    _, grad = run_step(loss_fn, torch.zeros(4, 4, dtype=torch.float64), labels)
    expected[0, 2] = 0.0
    assert torch.allclose(grad.abs() * 8, expected.double(), atol=1e-15)


def test_tail_ratio_eq8():
    counts = torch.tensor([100.0, 1.0, 5.0, 50.0], dtype=torch.float64)  # of 1000 images
    freq = counts / 1000
    assert math.isclose(tail_ratio(freq, 0.006), 6 / 156, rel_tol=1e-12)
    assert tail_ratio(freq, 0.0) == 0.0
    assert math.isclose(tail_ratio(freq, 1.0), 1.0)
    # the module keeps freq in float32
    assert math.isclose(EQLLoss(freq, lambda_=0.06).tail_ratio(), 56 / 156, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------
# EQLv2 weights, statistics, verified, scores


def test_eqlv2_weights_and_statistics_by_hand():
    c = 3
    loss_fn = EQLv2Loss(c, gamma=12.0, mu=0.8, alpha=4.0).train()
    loss_fn.pos_grad.copy_(torch.tensor([2.0, 0.5, 1.0]))
    loss_fn.neg_grad.copy_(torch.tensor([2.0, 1.0, 0.0]))
    g = torch.tensor([1.0, 0.5, math.inf])
    q = torch.tensor([1 / (1 + math.exp(-12 * 0.2)), 1 / (1 + math.exp(-12 * -0.3)), 1.0])
    r = 1 + 4 * (1 - q)
    assert torch.equal(loss_fn.gradient_ratio, g)
    rel_close(loss_fn.negative_weight, q, 1e-6)
    rel_close(loss_fn.positive_weight, r, 1e-6)

    labels = torch.tensor([0, 1, 3, 3, 2])  # 3 = background
    verified = torch.zeros(5, c, dtype=torch.bool)
    verified[0, 1] = True
    verified[1, 1] = True  # verified on a positive: the positive keeps r_1
    w = torch.stack([q, q, q, q, q])
    y = onehot(labels, c).float()
    w = y * r + (1 - y) * w
    w[0, 1] = 1.0
    w = torch.cat([w, torch.ones(5, 1)], 1)  # objectness column, weight 1
    loss, grad = run_step(loss_fn, torch.zeros(5, c + 1), labels, verified)
    rel_close(grad.abs() * 10, w, 1e-6)  # z = 0: |grad| = w / (2 N)
    rel_close(loss, math.log(2) * w.sum() / 5, 1e-6)
    # Statistics: |sigmoid(0) - y| w = w / 2 summed per class, objectness excluded.
    rel_close(loss_fn.pos_grad, torch.tensor([2.0, 0.5, 1.0]) + (w[:, :c] * y / 2).sum(0), 1e-6)
    rel_close(loss_fn.neg_grad, torch.tensor([2.0, 1.0, 0.0]) + (w[:, :c] * (1 - y) / 2).sum(0),
              1e-6)


def test_eqlv2_scores():
    z = torch.randn(7, 5)
    loss_fn = EQLv2Loss(4)
    rel_close(loss_fn.scores(z), torch.sigmoid(z[:, :4]) * (1 - torch.sigmoid(z[:, 4:])), 1e-6)
    with pytest.raises(ValueError, match="logits"):
        loss_fn.scores(torch.randn(7, 4))


# ----------------------------------------------------------------------------------------
# EFL: gradient = eq. 6 x alpha_t / avg_factor, statistics, next step's factors


def eq6(z, labels, gamma, gamma_b, alpha, avg_factor):
    """EFL eq. 6 times alpha_t / avg_factor, written as in the paper (x_t, p_t)."""
    y = onehot(labels, z.shape[1])
    xt = (2 * y - 1) * z
    pt = torch.sigmoid(xt)
    d = gamma * (2 * y - 1) / gamma_b * (1 - pt) ** gamma * (gamma * pt * torch.log(pt) + pt - 1)
    at = alpha * y + (1 - alpha) * (1 - y)
    return d * at * (labels >= 0).double()[:, None] / avg_factor


def test_efl_gradient_is_eq6_and_statistics_by_hand():
    c = 6
    logits, labels = make_batch(70, c, seed=5, ignore=True)
    logits = logits.double()
    loss_fn = EqualizedFocalLoss(c, gamma_b=2.0, scale=8.0, alpha=0.25).train()
    pos0 = torch.tensor([0.0, 1.0, 3.0, 0.5, 2.0, 0.0])
    neg0 = torch.tensor([1.0, 4.0, 2.0, 0.0, 8.0, 0.0])
    loss_fn.pos_grad.copy_(pos0)
    loss_fn.neg_grad.copy_(neg0)
    g = torch.tensor([0.0, 0.25, 1.0, 1.0, 0.25, 1.0])  # clamped; 1 where neg = 0
    gamma = 2.0 + 8.0 * (1 - g)
    assert torch.equal(loss_fn.gradient_ratio, g)
    assert torch.equal(loss_fn.focusing_factor, gamma)
    assert torch.equal(loss_fn.weighting_factor, gamma / 2.0)

    _, grad = run_step(loss_fn, logits, labels, 9.0)
    expected = eq6(logits, labels, gamma.double(), 2.0, 0.25, 9.0)
    rel_close(grad, expected, 1e-10)
    y = onehot(labels, c)
    valid = (labels >= 0).double()[:, None]
    rel_close(loss_fn.pos_grad, pos0.double() + (expected.abs() * y).sum(0), 1e-6)
    rel_close(loss_fn.neg_grad, neg0.double() + (expected.abs() * (1 - y) * valid).sum(0), 1e-6)

    # The next step uses the updated statistics.
    g1 = (loss_fn.pos_grad / loss_fn.neg_grad).clamp(0, 1)
    _, grad = run_step(loss_fn.eval(), logits, labels, 9.0)
    rel_close(grad, eq6(logits, labels, (2.0 + 8.0 * (1 - g1)).double(), 2.0, 0.25, 9.0), 1e-6)


# ----------------------------------------------------------------------------------------
# Fused path vs references over several training steps (loss, gradient, statistics)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eqlv2_matches_reference_over_steps(dtype):
    c = 11
    loss_fn, ref = EQLv2Loss(c).train(), RefEQLv2(c)
    for step in range(4):
        logits, labels = make_batch(150, c, seed=10 + step, dtype=dtype, objectness=True)
        verified = torch.rand(150, c, generator=torch.Generator().manual_seed(step)) < 0.2
        loss, grad = run_step(loss_fn, logits, labels, verified)
        z = logits.double().requires_grad_()
        ref_loss = ref(z, labels, verified)
        ref_loss.backward()
        rel_close(loss, ref_loss.detach())
        rel_close(grad, z.grad)
        rel_close(loss_fn.pos_grad, ref.pos)
        rel_close(loss_fn.neg_grad, ref.neg)


@pytest.mark.parametrize("quality", [False, True])
def test_efl_eqfl_match_reference_over_steps(quality):
    c = 13
    if quality:
        loss_fn, ref = EqualizedQualityFocalLoss(c, scale=4.0).train(), RefEFL(c, 2.0, 4.0, None)
    else:
        loss_fn, ref = EqualizedFocalLoss(c).train(), RefEFL(c)
    for step in range(4):
        logits, labels = make_batch(200, c, seed=20 + step, ignore=True, bg_frac=0.7)
        norm = float((labels.clamp(min=0) < c).sum() - (labels < 0).sum()) + 1.0
        args = [labels]
        if quality:
            q = torch.rand(200, generator=torch.Generator().manual_seed(step))
            args.append(q)
        loss, grad = run_step(loss_fn, logits, *args, norm)
        z = logits.double().requires_grad_()
        ref_loss = ref(z, labels, norm, quality=args[1].double() if quality else None)
        ref_loss.backward()
        rel_close(loss, ref_loss.detach())
        rel_close(grad, z.grad)
        rel_close(loss_fn.pos_grad, ref.pos)
        rel_close(loss_fn.neg_grad, ref.neg)
    assert (loss_fn.focusing_factor > 2.0).any()  # the factors did move away from focal


def test_eql_matches_reference_large_logits():
    c = 9
    freq = torch.rand(c, generator=torch.Generator().manual_seed(0)) * 4e-3
    logits, labels = make_batch(300, c, seed=30, scale=15.0)  # saturated sigmoids
    verified = torch.rand(300, c, generator=torch.Generator().manual_seed(1)) < 0.3
    loss, grad = run_step(EQLLoss(freq), logits, labels, verified)
    z = logits.double().requires_grad_()
    y = onehot(labels, c)
    tail = (freq < 1.76e-3).double()
    fg = (labels < c).double()[:, None]
    w = 1 - fg * tail * (1 - y)
    w[verified] = 1.0
    ref = (w * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() / 300
    ref.backward()
    rel_close(loss, ref.detach())
    rel_close(grad, z.grad)


@pytest.mark.parametrize("spread", [1e-3, 15.0])
def test_column_product_logs_match_reference(spread):
    """With weights q_j (and 1 on verified entries) the BCE logs are taken of column
    products over 120-row chunks: no underflow when every factor is 0.5 (logits near 0),
    and saturated logits (spread 15) keep their precision."""
    n, c = 1000, 3
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(n, c + 1, generator=g) * spread
    labels = torch.randint(0, c + 1, (n,), generator=g)
    verified = torch.rand(n, c, generator=g) < 0.4
    loss, grad = run_step(SigmoidCELoss(), logits, labels)
    z = logits.double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(z, onehot(labels, c + 1), reduction="sum") / n
    ref.backward()
    rel_close(loss, ref.detach(), 1e-6)
    rel_close(grad, z.grad, 1e-6)
    loss_fn, ref_fn = _stateful(EQLv2Loss(c)).train(), RefEQLv2(c)
    ref_fn.pos, ref_fn.neg = loss_fn.pos_grad.double().clone(), loss_fn.neg_grad.double().clone()
    loss, grad = run_step(loss_fn, logits, labels, verified)
    z = logits.double().requires_grad_()
    ref = ref_fn(z, labels, verified)
    ref.backward()
    rel_close(loss, ref.detach(), 1e-6)
    rel_close(grad, z.grad, 1e-6)
    rel_close(loss_fn.neg_grad, ref_fn.neg, 1e-6)


# ----------------------------------------------------------------------------------------
# gradcheck in float64 (eval mode: the statistics must not change between evaluations)


def _stateful(loss_fn):
    c = loss_fn.num_classes
    g = torch.Generator().manual_seed(7)
    loss_fn.pos_grad.copy_(torch.rand(c, generator=g))
    loss_fn.neg_grad.copy_(torch.rand(c, generator=g) * 2)
    return loss_fn.eval()


def _gradcheck_cases():
    c = 4
    freq = torch.tensor([0.3, 1e-4, 1e-3, 0.01], dtype=torch.float64)
    labels = torch.tensor([0, 4, 1, 3, -1, 2])
    fg_labels = labels.clamp(min=0)
    verified = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0],
                             [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    quality = torch.tensor([0.3, 0.9, 0.6, 1.0, 0.5, 0.0], dtype=torch.float64)
    gen = torch.Generator()

    def seql(z):
        gen.manual_seed(3)
        return SoftmaxEQLLoss(freq, lambda_=1.76e-3, gamma=0.7, generator=gen)(z, labels % 4)

    return {
        "eql": (c, lambda z: EQLLoss(freq)(z, fg_labels, verified)),
        "eqlv2": (c + 1, lambda z, m=_stateful(EQLv2Loss(c)): m(z, fg_labels, verified)),
        "efl": (c, lambda z, m=_stateful(EqualizedFocalLoss(c)): m(z, labels, 3.0)),
        "eqfl": (c, lambda z, m=_stateful(EqualizedQualityFocalLoss(c)): m(z, labels, quality,
                                                                           2.0)),
        "seql": (c, seql),
        "sigmoid_ce": (c, lambda z: SigmoidCELoss()(z, fg_labels)),
        "focal": (c, lambda z: FocalLoss(gamma=0.5)(z, labels, 2.0)),
        "qfl": (c, lambda z: QualityFocalLoss()(z, labels, quality, 2.0)),
        "softmax_ce": (c, lambda z: SoftmaxCELoss()(z, labels % 4)),
    }


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_gradcheck_float64(name):
    width, fn = _gradcheck_cases()[name]
    z = (torch.randn(6, width, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
         * 2).requires_grad_()
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# SEQL


def test_seql_gamma_one_drops_every_tail_negative():
    freq = torch.tensor([0.5, 1e-4, 1e-3, 0.2])
    logits, labels = make_batch(30, 4, seed=8, bg_frac=0.0)
    loss = SoftmaxEQLLoss(freq, lambda_=1.76e-3, gamma=1.0)(logits, labels)
    masked = logits.clone()
    for i, lab in enumerate(labels.tolist()):
        for k in (1, 2):
            if k != lab:
                masked[i, k] = -math.inf
    rel_close(loss, F.cross_entropy(masked, labels), 1e-6)


def test_seql_beta_is_bernoulli_gamma_per_sample_and_seeded():
    # Two classes, class 1 tail, every label 0: L_i is log(1 + e^(z1 - z0)) when beta = 0
    # and 0 when beta = 1, so the mean is (1 - gamma) times the full softmax loss.
    n = 20000
    logits = torch.tensor([[0.3, 1.1]]).expand(n, 2).contiguous()
    labels = torch.zeros(n, dtype=torch.long)
    full = F.cross_entropy(logits[:1], labels[:1]).item()
    gen = torch.Generator().manual_seed(11)
    seql = SoftmaxEQLLoss(torch.tensor([0.5, 1e-5]), lambda_=1e-3, gamma=0.3, generator=gen)
    loss = seql(logits, labels).item()
    sigma = full * math.sqrt(0.3 * 0.7 / n)
    assert abs(loss - 0.7 * full) < 4 * sigma
    gen.manual_seed(11)
    assert seql(logits, labels).item() == loss  # same seed, same draws


# ----------------------------------------------------------------------------------------
# Statistics bookkeeping


def test_statistics_update_only_in_training_with_grad():
    logits, labels = make_batch(40, 5, seed=9, ignore=True)
    z_obj = torch.cat([logits, torch.zeros(40, 1)], 1)
    for loss_fn, z, args in ((EqualizedFocalLoss(5), logits, (labels, 4.0)),
                             (EQLv2Loss(5), z_obj, (labels.clamp(min=0),))):
        loss_fn.eval()
        loss_fn(z.clone().requires_grad_(), *args).backward()
        assert loss_fn.pos_grad.sum() == 0 and loss_fn.neg_grad.sum() == 0
        loss_fn.train()
        with torch.no_grad():
            loss_fn(z, *args)
        assert loss_fn.neg_grad.sum() == 0
        loss_fn(z, *args)  # training + grad mode: updates even without backward
        first = loss_fn.neg_grad.clone()
        assert first.sum() > 0
        loss_fn(z, *args)
        assert not torch.equal(loss_fn.neg_grad, first)  # one forward = one update
        loss_fn.reset_statistics()
        assert loss_fn.pos_grad.sum() == 0 and loss_fn.neg_grad.sum() == 0


def test_state_dict_carries_statistics_and_missing_keys_restart():
    src = EqualizedFocalLoss(5)
    src.pos_grad.fill_(2.0)
    src.neg_grad.fill_(3.0)
    state = src.state_dict()
    assert set(state) == {"pos_grad", "neg_grad"}
    dst = EqualizedFocalLoss(5)
    dst.load_state_dict(state)
    assert torch.equal(dst.pos_grad, src.pos_grad) and torch.equal(dst.neg_grad, src.neg_grad)
    for strict in (True, False):
        with pytest.warns(UserWarning, match="neg_grad"):
            result = dst.load_state_dict({"pos_grad": torch.ones(5)}, strict=strict)
        assert result.missing_keys == []
        assert dst.pos_grad.sum() == 0 and dst.neg_grad.sum() == 0
    # Nested in a model: the warning names the prefixed keys.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), EQLv2Loss(3))
    old = {k: v for k, v in model.state_dict().items() if "grad" not in k}
    model[1].pos_grad.fill_(1.0)
    with pytest.warns(UserWarning, match="1.pos_grad"):
        model.load_state_dict(old)
    assert model[1].pos_grad.sum() == 0
    # EQL's frequencies are saved: a trained model predicts without its training data
    freq = torch.rand(3) / 10
    assert torch.equal(EQLLoss(freq).state_dict()["freq"], freq)


def test_deepcopy_keeps_statistics_and_generator():
    import copy

    loss_fn = EqualizedFocalLoss(3)
    loss_fn.pos_grad.fill_(1.0)
    clone = copy.deepcopy(loss_fn)
    assert torch.equal(clone.pos_grad, loss_fn.pos_grad)
    seql = SoftmaxEQLLoss(torch.rand(3) / 10, 1e-2, 0.5, generator=torch.Generator())
    assert isinstance(copy.deepcopy(seql).generator, torch.Generator)


# ----------------------------------------------------------------------------------------
# Autograd plumbing


def test_upstream_scale_empty_batch_half_precision_and_layout():
    logits, labels = make_batch(30, 4, seed=12, ignore=True)
    loss_fn = EqualizedFocalLoss(4).eval()
    _, grad = run_step(loss_fn, logits, labels, 2.0)
    z = logits.clone().requires_grad_()
    (3.0 * loss_fn(z, labels, 2.0)).backward()
    rel_close(z.grad, 3 * grad, 1e-6)

    z = logits.clone().requires_grad_()
    loss = 2.0 * loss_fn(z, labels, 2.0)
    loss.backward(retain_graph=True)
    loss.backward()  # the saved gradient survives the first, scaled, backward
    rel_close(z.grad, 4 * grad, 1e-6)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()

    # Non-contiguous logits (a transposed view) get the same values and gradient.
    zt = logits.t().contiguous().t().requires_grad_()
    assert not zt.is_contiguous()
    loss_t = loss_fn(zt, labels, 2.0)
    loss_t.backward()
    rel_close(zt.grad, grad, 1e-7)

    # bfloat16 logits: computed in float32, gradient returned in bfloat16.
    zb = logits.bfloat16().requires_grad_()
    lb = loss_fn(zb, labels, 2.0)
    lb.backward()
    assert lb.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16
    rel_close(zb.grad.float(), grad, 2e-2)

    # Empty batches: loss 0, a gradient of the right shape, statistics unchanged.
    for loss_fn, args, width in ((EqualizedFocalLoss(4).train(), (1.0,), 4),
                                 (EQLv2Loss(4).train(), (), 5), (EQLLoss(torch.rand(4)), (), 4),
                                 (SoftmaxEQLLoss(torch.rand(4), 0.5, 0.5), (), 4),
                                 (SoftmaxCELoss(), (), 4)):
        z = torch.zeros(0, width, requires_grad=True)
        loss = loss_fn(z, torch.zeros(0, dtype=torch.long), *args)
        loss.backward()
        assert loss.item() == 0.0 and z.grad.shape == (0, width)
        if hasattr(loss_fn, "pos_grad"):
            assert loss_fn.neg_grad.sum() == 0


# ----------------------------------------------------------------------------------------
# Bad input raises ValueError naming the argument


def _bad_input_cases():
    c = 4
    z = torch.randn(5, c)
    y = torch.tensor([0, 1, 4, 2, 3])
    freq = torch.tensor([0.3, 1e-4, 1e-3, 0.01])
    efl, eqfl, v2 = EqualizedFocalLoss(c), EqualizedQualityFocalLoss(c), EQLv2Loss(c)
    eql = EQLLoss(freq)
    q = torch.rand(5)
    return [
        ("logits", lambda: eql(torch.randn(5, c + 1), y)),
        ("logits", lambda: v2(z, y)),                          # missing objectness column
        ("logits", lambda: efl(torch.randn(5, c, 1), y, 1.0)),
        ("logits", lambda: efl(torch.randint(0, 3, (5, c)), y, 1.0)),
        ("labels", lambda: eql(z, torch.tensor([0, 1, 5, 2, 3]))),
        ("labels", lambda: eql(z, torch.tensor([0, -1, 4, 2, 3]))),  # no ignore for EQL
        ("labels", lambda: efl(z, torch.tensor([0, -2, 4, 2, 3]), 1.0)),
        ("labels", lambda: efl(z, y[:4], 1.0)),
        ("labels", lambda: efl(z, y[:, None], 1.0)),
        ("labels", lambda: efl(z, y.float(), 1.0)),
        ("labels", lambda: SoftmaxCELoss()(z, torch.tensor([0, 1, 4, 2, 3]))),
        ("verified", lambda: eql(z, y, torch.zeros(5, c + 1, dtype=torch.bool))),
        ("verified", lambda: v2(torch.randn(5, c + 1), y, torch.zeros(1, c, dtype=torch.bool))),
        ("verified", lambda: eql(z, y, torch.zeros(5, c))),
        ("quality", lambda: eqfl(z, y, q[:3], 1.0)),
        ("quality", lambda: eqfl(z, y, torch.tensor([0.5, 1.5, 0.0, 0.0, 0.0]), 1.0)),
        ("quality", lambda: eqfl(z, y, torch.tensor([0.5, float("nan"), 0.0, 0, 0]), 1.0)),
        ("avg_factor", lambda: efl(z, y, 0.0)),
        ("avg_factor", lambda: efl(z, y, -2.0)),
        ("avg_factor", lambda: efl(z, y, float("inf"))),
        ("avg_factor", lambda: efl(z, y, torch.ones(2))),
        ("avg_factor", lambda: eql(z, y, None, 0.0)),
        ("avg_factor", lambda: SoftmaxCELoss()(z, y % c, avg_factor=-1.0)),
        ("logits", lambda: eql(torch.tensor([[float("nan")] * c] * 5), y)),
        ("freq", lambda: EQLLoss(torch.tensor([0.1, -0.1]))),
        ("freq", lambda: EQLLoss(torch.tensor([3.0, 10.0]))),  # counts, not frequencies
        ("freq", lambda: EQLLoss(torch.zeros(2, 2))),
        ("lambda_", lambda: EQLLoss(freq, lambda_=-1e-3)),
        ("lambda_", lambda: SoftmaxEQLLoss(freq, lambda_=float("nan"), gamma=0.5)),
        ("lambda_", lambda: tail_ratio(freq, -1.0)),
        ("gamma", lambda: SoftmaxEQLLoss(freq, lambda_=1e-3, gamma=1.5)),
        ("gamma", lambda: EQLv2Loss(c, gamma=-1.0)),
        ("alpha", lambda: EQLv2Loss(c, alpha=-4.0)),
        ("alpha", lambda: EqualizedFocalLoss(c, alpha=1.5)),
        ("scale", lambda: EqualizedFocalLoss(c, scale=-1.0)),
        ("scale", lambda: EqualizedQualityFocalLoss(c, scale=-8.0)),
        ("gamma_b", lambda: EqualizedFocalLoss(c, gamma_b=0.0)),
        ("num_classes", lambda: EqualizedFocalLoss(0)),
        ("num_classes", lambda: EQLv2Loss(4.0)),
        ("generator", lambda: SoftmaxEQLLoss(freq, 1e-3, 0.5, generator=3)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_input_cases())))
def test_bad_input_raises_value_error_naming_argument(case):
    name, call = _bad_input_cases()[case]
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["positive", "negative", "ignored"])
def test_nonfinite_logits_raise_for_every_loss(value, where):
    c = 4
    labels = torch.tensor([1, 4, -1, 0])
    row, col = {"positive": (0, 1), "negative": (1, 2), "ignored": (2, 3)}[where]
    z = torch.randn(4, c)
    z[row, col] = value
    z_obj = torch.cat([z, torch.randn(4, 1)], 1)
    fg = labels.clamp(min=0)
    freq = torch.tensor([0.3, 1e-4, 1e-3, 0.01])
    calls = [
        lambda: EQLLoss(freq)(z, fg),
        lambda: EQLv2Loss(c)(z_obj, fg),
        lambda: SigmoidCELoss()(z, fg),
        lambda: EqualizedFocalLoss(c)(z, labels, 1.0),
        lambda: EqualizedQualityFocalLoss(c)(z, labels, torch.ones(4), 1.0),
        lambda: FocalLoss()(z, labels, 1.0),
        lambda: QualityFocalLoss()(z, labels, torch.ones(4), 1.0),
        lambda: SoftmaxEQLLoss(freq, 1e-2, 0.5)(z, fg % c),
        lambda: SoftmaxCELoss()(z, fg % c),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="logits"):
            call()


def test_row_blocks_do_not_change_results(monkeypatch):
    """Blocks of 1-3 rows (last block 1 row) give what a single block gives."""
    import eql_d2.losses._fused as fused

    c = 5
    logits, labels = make_batch(31, c, seed=13, ignore=True)
    quality = torch.rand(31, generator=torch.Generator().manual_seed(13))
    verified = torch.rand(31, c, generator=torch.Generator().manual_seed(14)) < 0.3
    freq = torch.tensor([0.3, 1e-4, 1e-3, 0.01, 0.5])
    zo = torch.cat([logits, torch.randn(31, 1)], 1)
    fg = labels.clamp(min=0)

    def run_all():
        out = []
        for make, z, args in (
                (lambda: EQLLoss(freq), logits, (fg, verified)),
                (lambda: SigmoidCELoss(), logits, (fg,)),
                (lambda: _stateful(EQLv2Loss(c)).train(), zo, (fg, verified)),
                (lambda: _stateful(EQLv2Loss(c)).train(), zo, (fg,)),
                (lambda: _stateful(EqualizedFocalLoss(c)).train(), logits, (labels, 3.0)),
                (lambda: _stateful(EqualizedQualityFocalLoss(c)).train(), logits,
                 (labels, quality, 3.0))):
            loss_fn = make()
            loss, grad = run_step(loss_fn, z, *args)
            stats = [loss_fn.pos_grad.clone(), loss_fn.neg_grad.clone()] \
                if hasattr(loss_fn, "pos_grad") else []
            out.append([loss, grad, *stats])
        return out

    whole = run_all()
    monkeypatch.setattr(fused, "_EAGER_CPU_BLOCK", 2 * c)  # 2 rows per block, then 1
    blocked = run_all()
    for a, b in zip(blocked, whole):
        for x, y in zip(a, b):
            rel_close(x, y, 1e-6)


def test_intra_op_threads_give_the_one_thread_result(monkeypatch):
    """Blocks with several intra-op threads agree with one thread, and the caller's thread
    setting is left as it was."""
    import eql_d2.losses._fused as fused

    c = 9
    logits, labels = make_batch(400, c, seed=15, ignore=True)
    monkeypatch.setattr(fused, "_EAGER_CPU_BLOCK", 7 * c)  # 58 blocks of 7 rows

    def run():
        loss_fn = _stateful(EqualizedFocalLoss(c)).train()
        loss, grad = run_step(loss_fn, logits, labels, 5.0)
        return loss, grad, loss_fn.pos_grad, loss_fn.neg_grad

    single = run()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threaded = run()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(threaded, single):
        rel_close(a, b, 1e-6)


def test_huge_finite_logits_are_not_reported_as_nonfinite():
    z = torch.tensor([[1e30, -1e30, 3.0], [2.0, 1e30, -1e30]])
    labels = torch.tensor([0, 3])
    for loss_fn, args in ((EqualizedFocalLoss(3), (labels, 1.0)), (SigmoidCELoss(), (labels,))):
        loss = loss_fn(z, *args)
        assert torch.isfinite(loss) and loss > 1e29
