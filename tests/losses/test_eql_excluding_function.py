"""EQL with and without the excluding function E(r) (Tan et al., CVPR 2020, eq. 7 and
Tab. 4): MODEL.CLS_LOSS.EQL.EXCLUDING_FUNCTION.

    w_ij = 1 - E(r_i) T_lambda(f_j) (1 - y_ij)                                  (eq. 7)

Without E(r) ("removing E(r) from Equation 7"), E(r_i) = 1 for background proposals too, so
tail categories get no negative gradient from them either. An entry in the image's
verified (positive or neg_category_ids) set keeps w_ij = 1 either way. The reference below
is written element by element from eq. 6-7, independently of the library.
"""

import math

import pytest
import torch

import eql_d2.modeling  # noqa: F401  (registers the classification losses)
from eql_d2.config import get_eql_cfg
from eql_d2.losses import EQLLoss
from eql_d2.modeling.cls_losses import build_cls_loss
from test_losses import make_batch, run_step

pytestmark = pytest.mark.usefixtures("one_thread")

LAMBDA = 1.76e-3
# categories 1 and 2 are tail (f < lambda), 0 and 3 are not
FREQ = torch.tensor([0.3, 1e-4, 1e-3, 0.01])
C = 4
LABELS = torch.tensor([0, 4, 1, 3, 4, 2])  # fg, bg, tail fg, fg, bg, tail fg
VERIFIED = torch.zeros(6, C, dtype=torch.bool)
VERIFIED[0, 2] = VERIFIED[1, 1] = VERIFIED[4, 0] = True  # in those images' label sets


def paper_weights(labels, freq, excluding_function, verified=None):
    """w_ij of eq. 7 [N, C], element by element; 1 on verified entries (sec. 4.2)."""
    n, c = len(labels), len(freq)
    w = torch.ones(n, c, dtype=torch.float64)
    for i in range(n):
        foreground = int(labels[i]) < c
        e = 1.0 if (foreground or not excluding_function) else 0.0   # E(r)
        for j in range(c):
            t = 1.0 if float(freq[j]) < LAMBDA else 0.0               # T_lambda(f_j)
            y = 1.0 if int(labels[i]) == j else 0.0
            w[i, j] = 1.0 - e * t * (1.0 - y)
            if verified is not None and verified[i, j]:
                w[i, j] = 1.0
    return w


def paper_loss(z, labels, weights):
    """Eq. 6 with sigmoid BCE per category: (1 / N) sum_ij w_ij BCE(z_ij, y_ij), the BCE
    -y log p - (1 - y) log(1 - p) written as max(z, 0) - z y + log(1 + exp(-|z|)) so that
    saturated logits stay finite."""
    total = z.new_zeros(())
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            x = z[i, j]
            y = 1.0 if int(labels[i]) == j else 0.0
            bce = torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs()))
            total = total + weights[i, j] * bce
    return total / z.shape[0]


@pytest.mark.parametrize("with_verified", [False, True], ids=["no_mask", "verified"])
def test_weights_at_zero_logits(with_verified):
    """At z = 0, BCE = log 2 and dL/dz = w (1/2 - y) / N: 2 N |grad| is w_ij itself."""
    verified = VERIFIED if with_verified else None
    expected = torch.tensor([
        [1.0, 0.0, 0.0, 1.0],  # foreground: tail negatives dropped (both settings)
        [1.0, 0.0, 0.0, 1.0],  # background: dropped only without E(r)
        [1.0, 1.0, 0.0, 1.0],  # its own tail category is a positive: weight 1
        [1.0, 0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0, 1.0],
        [1.0, 0.0, 1.0, 1.0],
    ], dtype=torch.float64)
    if with_verified:
        expected[VERIFIED] = 1.0
    with_e = expected.clone()
    with_e[LABELS == C] = 1.0  # E(r) = 0 on background rows
    for excluding, want in [(True, with_e), (False, expected)]:
        assert torch.equal(paper_weights(LABELS, FREQ, excluding, verified), want)
        loss_fn = EQLLoss(FREQ, LAMBDA, use_excluding_function=excluding)
        loss, grad = run_step(loss_fn, torch.zeros(6, C, dtype=torch.float64), LABELS, verified)
        assert torch.allclose(grad.abs() * 2 * 6, want, atol=1e-15)
        assert math.isclose(loss.item(), math.log(2) * want.sum().item() / 6, rel_tol=1e-14)


@pytest.mark.parametrize("with_verified", [False, True], ids=["no_mask", "verified"])
@pytest.mark.parametrize("excluding", [True, False], ids=["with_E", "without_E"])
@pytest.mark.parametrize("spread", [2.5, 15.0])  # 15: saturated sigmoids
def test_loss_and_gradient_match_the_paper(excluding, with_verified, spread):
    logits, labels = make_batch(40, C, seed=4, scale=spread, dtype=torch.float64)
    verified = (torch.rand(40, C, generator=torch.Generator().manual_seed(6)) < 0.25
                if with_verified else None)
    loss, grad = run_step(EQLLoss(FREQ, LAMBDA, use_excluding_function=excluding), logits,
                          labels, verified)
    z = logits.clone().requires_grad_()
    ref = paper_loss(z, labels, paper_weights(labels, FREQ, excluding, verified))
    ref.backward()
    # the fused kernel's F.softplus is linear past 20 (its threshold): a positive with
    # z < -20 loses up to e^-20 of its BCE, visible in float64 at spread 15
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-10)
    assert torch.allclose(grad, z.grad, rtol=1e-10, atol=1e-15)


def test_without_background_rows_the_switch_changes_nothing():
    logits, labels = make_batch(30, C, seed=8, bg_frac=0.0, dtype=torch.float64)
    with_e = run_step(EQLLoss(FREQ, LAMBDA), logits, labels, VERIFIED[:1].expand(30, C))
    without = run_step(EQLLoss(FREQ, LAMBDA, use_excluding_function=False), logits, labels,
                       VERIFIED[:1].expand(30, C))
    assert all(torch.equal(a, b) for a, b in zip(with_e, without))


@pytest.mark.parametrize("excluding", [True, False], ids=["with_E", "without_E"])
def test_gradcheck_float64(excluding):
    loss_fn = EQLLoss(FREQ.double(), LAMBDA, use_excluding_function=excluding)
    z = (torch.randn(6, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
         * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, LABELS, VERIFIED), (z,), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)


def test_switch_is_a_boolean():
    assert "use_excluding_function=True" in repr(EQLLoss(FREQ))
    for value in ("False", 0, None):
        with pytest.raises(ValueError, match="use_excluding_function"):
            EQLLoss(FREQ, use_excluding_function=value)


def test_config_key_reaches_the_built_loss():
    assert get_eql_cfg().MODEL.CLS_LOSS.EQL.EXCLUDING_FUNCTION is True
    logits = torch.randn(6, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for excluding in (True, False):
        cfg = get_eql_cfg(opts=["MODEL.CLS_LOSS.NAME", "eql",
                                "MODEL.CLS_LOSS.EQL.LAMBDA", str(LAMBDA),
                                "MODEL.CLS_LOSS.EQL.EXCLUDING_FUNCTION", str(excluding)])
        built = build_cls_loss(cfg, C, "two_stage")
        assert built.use_excluding_function is excluding
        assert f"use_excluding_function={excluding}" in repr(built)
        # no training data here: the frequencies come as from a checkpoint
        built.load_state_dict({"freq": FREQ})
        got = built.head_loss(logits, LABELS, len(logits), verified=VERIFIED)
        expected = paper_loss(logits, LABELS, paper_weights(LABELS, FREQ, excluding, VERIFIED))
        assert math.isclose(got.item(), expected.item(), rel_tol=1e-10)
