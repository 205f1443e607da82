"""EFL / EQFL with each component switched off (Li et al., CVPR 2022, Tab. 3: "WF" weighting
factor, "FF" focusing factor): MODEL.CLS_LOSS.EFL / EQFL .FOCUSING_FACTOR and .WEIGHTING_FACTOR.

Without the focusing factor the exponent is gamma_b for every category ("setting the
focusing factor always be gamma_b among all categories"); without the weighting factor
the weight gamma^j / gamma_b is 1. The reference below is written element by element from
eq. 3-5, independently of the library.
"""

import itertools
import math

import pytest
import torch

import eql_d2.modeling  # noqa: F401  (registers the classification losses)
from eql_d2.config import get_eql_cfg
from eql_d2.losses import (EqualizedFocalLoss, EqualizedQualityFocalLoss, FocalLoss,
                           QualityFocalLoss)
from eql_d2.modeling.cls_losses import build_cls_loss
from test_losses import make_batch, onehot, rel_close, run_step

pytestmark = pytest.mark.usefixtures("one_thread")

GAMMA_B, SCALE, ALPHA = 2.0, 8.0, 0.25
C = 4
# Statistics set by hand: g^j = 0, 1/4, 1 (clamped from 1.5) and 1 (no negatives yet), so
# gamma^j = 10, 8, 2, 2 and every switch changes the loss of categories 0 and 1.
POS = torch.tensor([0.0, 1.0, 3.0, 2.0])
NEG = torch.tensor([4.0, 4.0, 2.0, 0.0])
RATIO = torch.tensor([0.0, 0.25, 1.0, 1.0])
GAMMA = GAMMA_B + SCALE * (1 - RATIO)
# every category positive somewhere, background rows (C) and ignored rows (-1)
LABELS = torch.tensor([0, 1, 2, 3, C, C, -1, 1, 0])
QUALITY = torch.tensor([0.9, 0.3, 0.6, 1.0, 0.5, 0.2, 0.7, 0.8, 0.4], dtype=torch.float64)
NORMALIZER = 3.0

SWITCHES = list(itertools.product([True, False], repeat=2))  # (focusing, weighting)
SWITCH_IDS = [f"ff{int(ff)}-wf{int(wf)}" for ff, wf in SWITCHES]


def _loss(quality, ff, wf, **kwargs):
    """The library's EFL (quality False) or EQFL with the hand-set statistics."""
    if quality:
        loss_fn = EqualizedQualityFocalLoss(C, GAMMA_B, SCALE, use_focusing_factor=ff,
                                            use_weighting_factor=wf, **kwargs)
    else:
        loss_fn = EqualizedFocalLoss(C, GAMMA_B, SCALE, ALPHA, use_focusing_factor=ff,
                                     use_weighting_factor=wf, **kwargs)
    loss_fn.pos_grad.copy_(POS)
    loss_fn.neg_grad.copy_(NEG)
    return loss_fn


def _logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(LABELS), C, generator=g, dtype=torch.float64) * 2.5


def paper_factors(pos, neg, ff, wf):
    """Exponent and weight [C] of each category, from eq. 3-4 and Tab. 3's ablation."""
    exponent, weight = [], []
    for p, n in zip(pos.tolist(), neg.tolist()):
        g = 1.0 if n == 0 else min(max(p / n, 0.0), 1.0)
        gamma = GAMMA_B + SCALE * (1.0 - g)                     # eq. 3
        exponent.append(gamma if ff else GAMMA_B)
        weight.append(gamma / GAMMA_B if wf else 1.0)           # eq. 4
    return exponent, weight


def paper_loss(z, labels, exponent, weight, normalizer, quality=None):
    """Eq. 4 (binary targets, alpha_t) or eq. 5 (soft targets), element by element."""
    total = z.new_zeros(())
    for i in range(z.shape[0]):
        if labels[i] < 0:
            continue
        for j in range(z.shape[1]):
            p = torch.sigmoid(z[i, j])
            positive = int(labels[i]) == j
            if quality is None:
                pt = p if positive else 1 - p
                at = ALPHA if positive else 1 - ALPHA
                total = total - at * weight[j] * (1 - pt) ** exponent[j] * torch.log(pt)
            else:
                t = float(quality[i]) if positive else 0.0
                bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
                total = total + weight[j] * (t - p).abs() ** exponent[j] * bce
    return total / normalizer


@pytest.mark.parametrize("ff,wf", SWITCHES, ids=SWITCH_IDS)
def test_factors_report_what_is_applied(ff, wf):
    loss_fn = _loss(False, ff, wf)
    assert torch.equal(loss_fn.gradient_ratio, RATIO)
    assert torch.equal(loss_fn.focusing_factor, GAMMA if ff else torch.full((C,), GAMMA_B))
    assert torch.equal(loss_fn.weighting_factor, GAMMA / GAMMA_B if wf else torch.ones(C))
    assert f"use_focusing_factor={ff}, use_weighting_factor={wf}" in repr(loss_fn)
    exponent, weight = paper_factors(POS, NEG, ff, wf)
    assert loss_fn.focusing_factor.tolist() == exponent
    assert loss_fn.weighting_factor.tolist() == weight


@pytest.mark.parametrize("quality", [False, True], ids=["efl", "eqfl"])
@pytest.mark.parametrize("ff,wf", SWITCHES, ids=SWITCH_IDS)
def test_loss_gradient_statistics_match_the_paper(ff, wf, quality):
    """One training step (loss, gradient, statistics), then an evaluation step that uses
    the updated statistics."""
    loss_fn = _loss(quality, ff, wf).train()
    q = QUALITY if quality else None
    extra = [q] if quality else []
    pos, neg = POS.double().clone(), NEG.double().clone()
    # the hand-set factors are exact; the updated ones come from float32 buffers
    for step, (train, rtol) in enumerate([(True, 1e-12), (False, 1e-6)]):
        logits = _logits(step)
        loss, grad = run_step(loss_fn.train(train), logits, LABELS, *extra, NORMALIZER)
        z = logits.clone().requires_grad_()
        ref = paper_loss(z, LABELS, *paper_factors(pos, neg, ff, wf), NORMALIZER, q)
        ref.backward()
        rel_close(loss, ref.detach(), rtol)
        rel_close(grad, z.grad, rtol)
        if train:
            y = onehot(LABELS, C)
            valid = (LABELS >= 0).double()[:, None]
            pos += (z.grad.abs() * y).sum(0)
            neg += (z.grad.abs() * (1 - y) * valid).sum(0)
        rel_close(loss_fn.pos_grad, pos, 1e-6)
        rel_close(loss_fn.neg_grad, neg, 1e-6)
    assert (loss_fn.pos_grad != POS).all() and (loss_fn.neg_grad != NEG).all()


@pytest.mark.parametrize("quality", [False, True], ids=["efl", "eqfl"])
@pytest.mark.parametrize("ff,wf", SWITCHES, ids=SWITCH_IDS)
def test_gradcheck_float64(ff, wf, quality):
    loss_fn = _loss(quality, ff, wf).eval()  # the statistics stay fixed between evaluations
    extra = [QUALITY] if quality else []
    z = _logits(5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, LABELS, *extra, NORMALIZER), (z,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_factors_off_is_the_focal_loss(dtype):
    """EFL with both components off is focal loss (and EQFL quality focal loss) at every
    step, whatever the statistics; the statistics still accumulate."""
    logits, labels = make_batch(60, C, seed=1, ignore=True, dtype=dtype)
    quality = torch.rand(60, generator=torch.Generator().manual_seed(2), dtype=dtype)
    pairs = [(_loss(False, False, False).train(), FocalLoss(GAMMA_B, ALPHA), []),
             (_loss(True, False, False).train(), QualityFocalLoss(GAMMA_B), [quality])]
    for loss_fn, baseline, extra in pairs:
        for _ in range(2):
            before = loss_fn.pos_grad.clone(), loss_fn.neg_grad.clone()
            loss, grad = run_step(loss_fn, logits, labels, *extra, NORMALIZER)
            base_loss, base_grad = run_step(baseline, logits, labels, *extra, NORMALIZER)
            assert torch.equal(loss, base_loss) and torch.equal(grad, base_grad)
            assert (loss_fn.pos_grad > before[0]).all() and (loss_fn.neg_grad > before[1]).all()


def test_switches_are_booleans():
    for value in ("False", 0, None):
        with pytest.raises(ValueError, match="use_focusing_factor"):
            EqualizedFocalLoss(C, use_focusing_factor=value)
        with pytest.raises(ValueError, match="use_weighting_factor"):
            EqualizedQualityFocalLoss(C, use_weighting_factor=value)


@pytest.mark.parametrize("name", ["efl", "eqfl"])
def test_config_keys_reach_the_built_loss(name):
    cfg = get_eql_cfg(opts=["MODEL.CLS_LOSS.NAME", name])
    node = f"MODEL.CLS_LOSS.{name.upper()}"
    assert cfg.MODEL.CLS_LOSS[name.upper()].FOCUSING_FACTOR is True
    assert cfg.MODEL.CLS_LOSS[name.upper()].WEIGHTING_FACTOR is True
    built = build_cls_loss(cfg, C, "dense")
    assert built.use_focusing_factor and built.use_weighting_factor
    quality = name == "eqfl"
    extra = dict(quality=QUALITY) if quality else {}
    for ff, wf in SWITCHES:
        cfg = get_eql_cfg(opts=["MODEL.CLS_LOSS.NAME", name, f"{node}.FOCUSING_FACTOR", str(ff),
                                f"{node}.WEIGHTING_FACTOR", str(wf)])
        built = build_cls_loss(cfg, C, "dense").eval()
        assert (built.use_focusing_factor, built.use_weighting_factor) == (ff, wf)
        built.pos_grad.copy_(POS)
        built.neg_grad.copy_(NEG)
        z = _logits(3)
        got = built.head_loss(z, LABELS, NORMALIZER, **extra)
        expected = paper_loss(z, LABELS, *paper_factors(POS, NEG, ff, wf), NORMALIZER,
                              QUALITY if quality else None)
        assert math.isclose(got.item(), expected.item(), rel_tol=1e-12)
