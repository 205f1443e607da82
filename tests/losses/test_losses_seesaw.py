"""Tests of eql_d2.losses.SeesawLoss against the equations of Wang et al. (CVPR 2021).

The reference below is written from the paper's equations with explicit loops over samples
and classes, in float64, independently of the library's vectorized log-space form.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import run_on_gloo_workers
from eql_d2.losses import SeesawLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_seesaw(z, labels, counts, p, q, eps=1e-2):
    """Seesaw loss with objectness, from eq. 2-5, one sample and one class at a time.

    z: [N, C+2] float64 (requires grad), labels: list of ints in 0..C, counts: list of C
    cumulative counts N_j (those the step uses). Returns the loss (autograd graph to z).
    """
    n, c = z.shape[0], z.shape[1] - 2
    total = z.new_zeros(())
    for i in range(n):
        lab = labels[i]
        # objectness: 2-way softmax CE, column c is fg, c + 1 is bg
        target = c if lab < c else c + 1
        total = total - (z[i, target] - torch.logsumexp(z[i, c:], 0))
        if lab == c:
            continue
        row = z[i, :c]
        expo = [math.exp(v) for v in row.detach().tolist()]
        sigma = [e / sum(expo) for e in expo]
        n_i = max(counts[lab], 1)
        denom = torch.exp(row[lab])
        for j in range(c):
            if j == lab:
                continue
            n_j = max(counts[j], 1)
            m = (n_j / n_i) ** p if n_j < n_i else 1.0
            ratio = sigma[j] / max(sigma[lab], eps)
            comp = ratio ** q if ratio > 1 else 1.0
            denom = denom + m * comp * torch.exp(row[j])
        total = total - (row[lab] - torch.log(denom))
    return total / n


def hand_batch():
    """C = 4. Rows chosen so that mitigation and compensation both act:

    row 0, class 0 (head): classes 1-3 are rarer, so their logits are mitigated, and
        class 2 outscores class 0 (compensation);
    row 1, class 2: only class 3 is rarer; class 3 scores far above class 2 and sigma_2
        is below eps (the eps bound acts);
    row 2, class 3 (never seen before this batch): no mitigation (no class is rarer);
    rows 3-4: background (objectness only); row 5, class 1.
    """
    z = torch.tensor([
        [1.0, -0.5, 2.0, 0.3, 1.2, -0.4],
        [0.2, 1.0, -3.0, 3.5, 0.1, 0.6],
        [0.5, 0.1, -0.2, -1.0, -0.3, 0.2],
        [0.3, 0.2, 0.1, 0.0, -1.0, 1.5],
        [2.0, -1.0, 0.5, 0.7, 0.4, 0.4],
        [-0.7, 0.4, 1.1, 0.9, 0.8, -0.6],
    ], dtype=torch.float64)
    labels = torch.tensor([0, 2, 3, 4, 4, 1])
    prior = torch.tensor([500, 40, 7, 0])
    return z, labels, prior


def run(loss_fn, z, labels):
    z = z.detach().clone().requires_grad_()
    loss = loss_fn(z, labels)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("p,q", [(0.8, 0.0), (0.0, 2.0), (0.8, 2.0), (1.3, 0.7)],
                         ids=["mitigation", "compensation", "both", "other_exponents"])
def test_loss_and_gradient_match_paper_equations(p, q):
    z, labels, prior = hand_batch()
    loss_fn = SeesawLoss(4, p=p, q=q).train()
    loss_fn.cum_samples.copy_(prior)
    loss, grad = run(loss_fn, z, labels)
    # The step uses the counts including its own batch: 500+1, 40+1, 7+1, 0+1.
    counts = (prior + torch.tensor([1, 1, 1, 1])).tolist()
    assert loss_fn.cum_samples.tolist() == counts
    zr = z.clone().requires_grad_()
    ref = ref_seesaw(zr, labels.tolist(), counts, p, q)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-12 * ref.item()
    torch.testing.assert_close(grad, zr.grad, rtol=1e-10, atol=1e-14)
    # The factors matter on this batch: p = q = 0 (plain softmax CE) differs.
    zp = z.clone().requires_grad_()
    plain = ref_seesaw(zp, labels.tolist(), counts, 0.0, 0.0)
    assert abs(plain.item() - ref.item()) > 1e-3


def test_zero_exponents_are_softmax_ce_plus_objectness_ce():
    z, labels, prior = hand_batch()
    loss_fn = SeesawLoss(4, p=0.0, q=0.0)
    loss_fn.cum_samples.copy_(prior)
    loss, grad = run(loss_fn, z, labels)
    zr = z.clone().requires_grad_()
    fg = labels < 4
    cls = F.cross_entropy(zr[fg, :4], labels[fg], reduction="sum")
    obj = F.cross_entropy(zr[:, 4:], (~fg).long(), reduction="sum")
    ref = (cls + obj) / 6
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-13 * ref.item()
    torch.testing.assert_close(grad, zr.grad, rtol=1e-12, atol=1e-15)


def test_random_batches_over_steps_match_reference():
    c = 6
    g = torch.Generator().manual_seed(0)
    loss_fn = SeesawLoss(c).train()
    counts = [0] * c
    for _ in range(3):
        z = torch.randn(12, c + 2, generator=g, dtype=torch.float64) * 3
        labels = torch.randint(0, c + 1, (12,), generator=g)
        labels[labels == 1] = 0  # class 0 frequent, class 1 absent
        loss, grad = run(loss_fn, z, labels)
        for lab in labels.tolist():
            if lab < c:
                counts[lab] += 1
        zr = z.clone().requires_grad_()
        ref = ref_seesaw(zr, labels.tolist(), counts, 0.8, 2.0)
        ref.backward()
        assert abs(loss.item() - ref.item()) <= 1e-12 * ref.item()
        torch.testing.assert_close(grad, zr.grad, rtol=1e-10, atol=1e-14)
    assert loss_fn.cum_samples.tolist() == counts and counts[1] == 0


def test_gradcheck_float64():
    # gradcheck differentiates through everything, but the compensation factor depends on
    # the logits and is a constant for the gradient by definition (sigma detached), so only
    # q = 0 is a function whose derivative the loss's gradient is; the q > 0 gradients are
    # checked against the reference above.
    z0, labels, prior = hand_batch()
    loss_fn = SeesawLoss(4, p=0.8, q=0.0).eval()  # eval: the counts stay fixed
    loss_fn.cum_samples.copy_(prior + 1)
    z = (z0 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: loss_fn(t, labels), (z,), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


def test_counts_accumulate_only_in_training_with_grad():
    z, labels, _ = hand_batch()
    loss_fn = SeesawLoss(4)
    loss_fn.eval()
    loss_fn(z.clone().requires_grad_(), labels).backward()
    assert loss_fn.cum_samples.sum() == 0
    loss_fn.train()
    with torch.no_grad():
        loss_fn(z, labels)
    assert loss_fn.cum_samples.sum() == 0
    loss_fn(z, labels)  # training + grad mode: one update per forward, even without backward
    assert loss_fn.cum_samples.tolist() == [1, 1, 1, 1]  # background (label 4) not counted
    loss_fn(z, labels)
    assert loss_fn.cum_samples.tolist() == [2, 2, 2, 2]
    assert loss_fn.cum_samples.dtype == torch.int64
    loss_fn.reset_statistics()
    assert loss_fn.cum_samples.sum() == 0


def test_eval_uses_stored_counts_without_the_batch():
    z, labels, prior = hand_batch()
    loss_fn = SeesawLoss(4).eval()
    loss_fn.cum_samples.copy_(prior)
    loss = loss_fn(z, labels)
    zr = z.clone().requires_grad_()
    assert abs(loss.item() - ref_seesaw(zr, labels.tolist(), prior.tolist(), 0.8, 2.0).item()) \
        <= 1e-12 * loss.item()


def test_state_dict_round_trip_and_missing_counts_restart():
    src = SeesawLoss(5)
    src.cum_samples.copy_(torch.tensor([3, 0, 2**40, 7, 1]))  # beyond float32's exact range
    state = src.state_dict()
    assert set(state) == {"cum_samples"}
    dst = SeesawLoss(5)
    dst.load_state_dict(state)
    assert torch.equal(dst.cum_samples, src.cum_samples)
    for strict in (True, False):
        dst.cum_samples.fill_(4)
        with pytest.warns(UserWarning, match="cum_samples"):
            result = dst.load_state_dict({}, strict=strict)
        assert result.missing_keys == [] and dst.cum_samples.sum() == 0
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), SeesawLoss(3))
    old = {k: v for k, v in model.state_dict().items() if "cum" not in k}
    model[1].cum_samples.fill_(2)
    with pytest.warns(UserWarning, match="1.cum_samples"):
        model.load_state_dict(old)
    assert model[1].cum_samples.sum() == 0


def test_scores_are_class_softmax_times_objectness():
    z, _, _ = hand_batch()
    s = SeesawLoss(4).scores(z)
    assert s.shape == (6, 4)
    obj_fg = torch.softmax(z[:, 4:], 1)[:, 0]
    torch.testing.assert_close(s, torch.softmax(z[:, :4], 1) * obj_fg[:, None])
    torch.testing.assert_close(s.sum(1), obj_fg)


def test_empty_batch_half_precision_and_large_logits():
    loss_fn = SeesawLoss(4).train()
    z = torch.zeros(0, 6, requires_grad=True)
    loss = loss_fn(z, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and z.grad.shape == (0, 6) and loss_fn.cum_samples.sum() == 0
    # bfloat16 logits: computed in float32, gradient returned in bfloat16
    z64, labels, prior = hand_batch()
    loss_fn = SeesawLoss(4).eval()
    loss_fn.cum_samples.copy_(prior + 1)
    ref, ref_grad = run(loss_fn, z64, labels)
    zb = z64.bfloat16().requires_grad_()
    lb = loss_fn(zb, labels)
    lb.backward()
    assert lb.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16
    assert abs(lb.item() - ref.item()) < 2e-2 * ref.item()
    # logits of cosine-classifier scale and beyond stay finite
    big, grad = run(loss_fn, z64 * 60, labels)
    assert torch.isfinite(big) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name,call", [
    ("logits", lambda: SeesawLoss(4)(torch.randn(3, 5), torch.tensor([0, 1, 4]))),
    ("logits", lambda: SeesawLoss(4)(torch.randint(0, 2, (3, 6)), torch.tensor([0, 1, 4]))),
    ("labels", lambda: SeesawLoss(4)(torch.randn(3, 6), torch.tensor([0, 1, 5]))),
    ("labels", lambda: SeesawLoss(4)(torch.randn(3, 6), torch.tensor([0, -1, 4]))),
    ("labels", lambda: SeesawLoss(4)(torch.randn(3, 6), torch.tensor([0.0, 1.0, 4.0]))),
    ("logits", lambda: SeesawLoss(4)(torch.tensor([[0.0] * 5 + [math.nan]] * 3),
                                     torch.tensor([0, 1, 4]))),
    ("num_classes", lambda: SeesawLoss(0)),
    ("p", lambda: SeesawLoss(4, p=-0.1)),
    ("q", lambda: SeesawLoss(4, q=math.inf)),
    ("eps", lambda: SeesawLoss(4, eps=0.0)),
])
def test_bad_input_raises_value_error_naming_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call()


# ----------------------------------------------------------------------------------------
# Two gloo workers with half batches = one process on the whole batch

C = 7
N = 48
STEPS = 3


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        z = torch.randn(N, C + 2, generator=g, dtype=torch.float64) * 2
        labels = torch.randint(0, C + 1, (N,), generator=g)
        # skew the halves: class 0 only in the first half, class 5 only in the second
        labels[: N // 2][labels[: N // 2] == 5] = 0
        labels[N // 2:][labels[N // 2:] == 0] = 5
        out.append((z, labels))
    return out


def _run(rows):
    """Train a SeesawLoss for STEPS steps on ``rows`` of each batch: counts, losses and
    logit gradients of every step."""
    loss_fn = SeesawLoss(C).train()
    losses, grads = [], []
    for z, labels in _batches():
        zz = z[rows].clone().requires_grad_()
        loss = loss_fn(zz, labels[rows])
        loss.backward()
        losses.append(loss.detach())
        grads.append(zz.grad)
    return {"counts": loss_fn.cum_samples.clone(), "losses": torch.stack(losses),
            "grads": torch.stack(grads)}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_gloo_workers_match_one_process_on_the_whole_batch():
    ranks = run_on_gloo_workers(_run, N)
    single = _run(slice(0, N))
    assert torch.equal(ranks[0]["counts"], ranks[1]["counts"])
    assert torch.equal(ranks[0]["counts"], single["counts"])
    # Each worker's loss is its half's sum / (N / 2): the workers' mean is the whole
    # batch's loss, and each worker's logit gradient is twice the whole batch's (DDP then
    # averages the parameter gradients over the two workers).
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"],
                               rtol=1e-12, atol=0)
    whole = torch.cat([ranks[0]["grads"], ranks[1]["grads"]], 1) / 2
    torch.testing.assert_close(whole, single["grads"], rtol=1e-10, atol=1e-15)
    # Without the all_reduce each half would count only its own labels: the halves' own
    # counts differ from the whole, and so would the mitigation factors.
    local = _run(slice(0, N // 2))
    assert not torch.equal(local["counts"], single["counts"])
    assert not torch.allclose(local["grads"][1:], single["grads"][1:, : N // 2] * 2)


def test_training_step_reads_nothing_back(monkeypatch):
    """As for a CUDA tensor: no value read on the host, no mask indexing (no sync)."""
    from eql_d2.losses import _checks
    from test_no_host_sync import recorded_host_reads

    monkeypatch.setattr(_checks, "_values_on_host", lambda t: False)
    monkeypatch.delenv(_checks.DEBUG_CHECKS_ENV, raising=False)
    z, labels, prior = hand_batch()
    loss_fn = SeesawLoss(4).train()
    loss_fn.cum_samples.copy_(prior)
    with recorded_host_reads() as calls:
        loss, grad = run(loss_fn, z.float(), labels)
    assert not calls, calls
    assert torch.isfinite(grad).all() and loss_fn.cum_samples.sum() == prior.sum() + 4
