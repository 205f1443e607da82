"""Half-precision logits under a mixed-precision loss scale.

The fused losses must give the gradient that autograd of the formula gives under autocast:
computed in float32 (here: float64, the reference), multiplied by the loss scale, and only
then rounded to the logits' dtype. Rounding before the scale flushes the small gradients
of easy negatives to zero in float16.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from eql_d2.losses import (EQLLoss, EQLv2Loss, EqualizedFocalLoss, EqualizedQualityFocalLoss,
                           FocalLoss, QualityFocalLoss, SigmoidCELoss)

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_SCALE = 2.0 ** 16
C = 40


# ----------------------------------------------------------------------------------------
# float64 references: autograd over the formulas


def _bce_weighted(z, labels, width, weight):
    y = (labels[:, None] == torch.arange(width)).to(z.dtype)
    return (weight(y) * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() \
        / z.shape[0]


def ref_eql(z, labels, freq, lambda_, verified):
    tail = (freq < lambda_).double()
    fg = (labels < C).double()[:, None]

    def weight(y):
        w = 1 - fg * tail * (1 - y)
        return torch.where(verified, torch.ones_like(w), w)
    return _bce_weighted(z, labels, C, weight)


def ref_eqlv2(z, labels, q, r, verified):
    qv = torch.cat([q, q.new_ones(1)]).expand(z.shape[0], C + 1).clone()
    if verified is not None:
        qv[:, :C][verified] = 1.0
    rv = torch.cat([r, r.new_ones(1)])
    return _bce_weighted(z, labels, C + 1, lambda y: y * rv + (1 - y) * qv)


def ref_focal(z, labels, gamma, weight, alpha, avg_factor, quality=None):
    valid = (labels >= 0).double()[:, None]
    y = (labels[:, None] == torch.arange(C)).double()
    p = torch.sigmoid(z)
    if quality is None:
        pt = p * y + (1 - p) * (1 - y)
        at = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
        el = -at * weight * (1 - pt) ** gamma * torch.log(pt)
    else:
        t = y * quality[:, None]
        el = -weight * (t - p).abs() ** gamma * (t * torch.log(p) + (1 - t) * torch.log(1 - p))
    return (el * valid).sum() / avg_factor


# ----------------------------------------------------------------------------------------
# Cases: loss module, inputs, reference


def _inputs(seed, objectness=False, ignore=False, centre=-11.0):
    g = torch.Generator().manual_seed(seed)
    n = 300
    # Mostly confident negatives (p ~ 1e-5 around the default centre): their gradients
    # are tiny per entry.
    z = torch.randn(n, C + objectness, generator=g) * 1.5 + centre
    labels = torch.randint(0, C, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.5] = C
    if ignore:
        labels[torch.rand(n, generator=g) < 0.1] = -1
    fg = (labels >= 0) & (labels < C)
    z[fg, labels[fg]] = torch.randn(int(fg.sum()), generator=g) + 1.0
    verified = torch.rand(n, C, generator=g) < 0.2
    quality = torch.rand(n, generator=g)
    return z, labels, verified, quality


def _with_statistics(loss_fn, seed):
    """Give a stateful loss class-specific weights (ratios from 0.05 to 1.5)."""
    g = torch.Generator().manual_seed(seed)
    loss_fn.neg_grad.copy_(torch.rand(loss_fn.num_classes, generator=g) * 100 + 1)
    loss_fn.pos_grad.copy_(loss_fn.neg_grad * torch.linspace(0.05, 1.5, loss_fn.num_classes))
    return loss_fn.train()


def _case(name):
    """(make loss, logits [float32], args after logits, float64 reference of the logits)."""
    freq = torch.linspace(1e-4, 0.3, C) ** 2
    if name in ("eql", "eql_verified", "sigmoid"):
        z, labels, verified, _ = _inputs(1)
        z = z[:, :C] if name != "sigmoid" else z
        if name == "sigmoid":
            return (SigmoidCELoss, z, (labels,),
                    lambda x: _bce_weighted(x, labels, C, lambda y: torch.ones_like(y)))
        v = verified if name == "eql_verified" else torch.zeros_like(verified)
        return (lambda: EQLLoss(freq, lambda_=1e-2), z, (labels, v if name == "eql_verified"
                                                         else None),
                lambda x: ref_eql(x, labels, freq, 1e-2, v))
    if name in ("eqlv2", "eqlv2_verified"):
        z, labels, verified, _ = _inputs(2, objectness=True)
        v = verified if name == "eqlv2_verified" else None
        probe = _with_statistics(EQLv2Loss(C), 3)
        q = probe.negative_weight.double()
        r = probe.positive_weight.double()
        return (lambda: _with_statistics(EQLv2Loss(C), 3), z, (labels, v),
                lambda x: ref_eqlv2(x, labels, q, r, v))
    # the focal factor (1 - p_t)^gamma shrinks negatives' gradients further: less confident
    z, labels, _, quality = _inputs(4, ignore=True, centre=-8.0)
    norm = 37.0
    if name in ("efl", "eqfl"):
        probe = _with_statistics(EqualizedFocalLoss(C), 5)
        gamma = probe.focusing_factor.double()
        weight = probe.weighting_factor.double()
        if name == "efl":
            return (lambda: _with_statistics(EqualizedFocalLoss(C), 5), z, (labels, norm),
                    lambda x: ref_focal(x, labels, gamma, weight, 0.25, norm))
        return (lambda: _with_statistics(EqualizedQualityFocalLoss(C), 5), z,
                (labels, quality, norm),
                lambda x: ref_focal(x, labels, gamma, weight, None, norm, quality.double()))
    if name == "focal":
        return (FocalLoss, z, (labels, norm),
                lambda x: ref_focal(x, labels, 2.0, 1.0, 0.25, norm))
    assert name == "qfl"
    return (QualityFocalLoss, z, (labels, quality, norm),
            lambda x: ref_focal(x, labels, 2.0, 1.0, None, norm, quality.double()))


CASES = ["eql", "eql_verified", "sigmoid", "eqlv2", "eqlv2_verified", "efl", "eqfl", "focal",
         "qfl"]


def _step(loss_fn, z, args, scale=LOSS_SCALE):
    z = z.detach().clone().requires_grad_()
    loss = loss_fn(z, *args)
    (loss * scale).backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_scaled_half_gradient_is_the_reference_rounded_once(name, dtype):
    make, z32, args, ref = _case(name)
    zh = z32.to(dtype)
    x = zh.double().requires_grad_()  # the half logits, exactly
    ref(x).backward()
    ref_scaled = x.grad * LOSS_SCALE
    expected = ref_scaled.to(dtype)

    loss_fn = make()
    loss, grad = _step(loss_fn, zh, args)
    assert loss.dtype == torch.float32 and grad.dtype == dtype

    # one rounding of the float32 computation: at most one unit in the last place of the
    # dtype (subnormals: the smallest subnormal) away from the reference rounded
    info = torch.finfo(dtype)
    ulp = torch.clamp(ref_scaled.abs() * info.eps, min=info.smallest_normal * info.eps)
    err = (grad.double() - expected.double()).abs()
    assert (err <= ulp).all(), f"max err/ulp {(err / ulp).max().item():.2f}"
    # nothing the reference keeps is flushed to zero (two subnormal steps leave no doubt)
    kept = ref_scaled.abs() >= 2 * info.smallest_normal * info.eps
    assert not (grad[kept] == 0).any()
    if dtype == torch.float16:  # the case is one where rounding before the scale fails
        flushed = (x.grad.to(dtype) == 0) & kept
        assert flushed.sum() > 0.1 * z32.numel()

    if hasattr(loss_fn, "pos_grad"):  # statistics: those of the float32 path
        ref_fn = make()
        _step(ref_fn, zh.float(), args)
        for a, b in ((loss_fn.pos_grad, ref_fn.pos_grad), (loss_fn.neg_grad, ref_fn.neg_grad)):
            assert torch.allclose(a, b, rtol=1e-3, atol=0.0)


def test_eqlv2_rare_negative_gradient_survives_float16():
    """1024 x 400 logits near p = 1e-4, half the classes at g = 0.1 (negative weight
    sigmoid(12 (0.1 - 0.8)) ~ 2e-4): their negative gradient, about 1e-11 per entry, is
    below float16's range until the 2^16 loss scale lifts it."""
    n, c = 1024, 400
    g = torch.Generator().manual_seed(0)
    z = math.log(1e-4 / (1 - 1e-4)) + 0.1 * torch.randn(n, c + 1, generator=g)
    labels = torch.full((n,), c)  # background rows: every class entry is a negative
    labels[: n // 4] = torch.randint(c // 2, c, (n // 4,), generator=g)  # frequent positives
    rare = slice(0, c // 2)

    def loss_fn():
        fn = EQLv2Loss(c).train()
        fn.neg_grad.fill_(100.0)
        fn.pos_grad.fill_(100.0)
        fn.pos_grad[rare] = 10.0  # g = 0.1
        return fn

    sums = {}
    for dtype in (torch.float32, torch.float16):
        _, grad = _step(loss_fn(), z.to(dtype), (labels,))
        sums[dtype] = grad[:, rare].double().sum().item()
    assert sums[torch.float32] > 0.1
    assert sums[torch.float16] == pytest.approx(sums[torch.float32], rel=0.02)


def test_retained_graph_and_plain_backward_in_half():
    """Scaled twice through a retained graph, and unscaled: the half gradient is the
    float32 one times the upstream gradient, rounded once."""
    make, z32, args, _ = _case("efl")
    zh = z32.half()
    _, g32 = _step(make(), zh.float(), args, scale=1.0)
    z = zh.clone().requires_grad_()
    loss = make()(z, *args)
    (loss * 4.0).backward(retain_graph=True)
    first = z.grad.clone()
    z.grad = None
    loss.backward()
    assert torch.equal(first, (g32 * 4.0).half())
    assert torch.equal(z.grad, g32.half())
