"""Tests of the class-balanced loss (Cui et al., CVPR 2019) and balanced group softmax (BAGS,
Li et al., CVPR 2020) against references written here from the papers' equations, one
sample and one class at a time in float64, and of their gradients (gradcheck)."""

import math

import pytest
import torch

from eql_d2.losses import (BalancedGroupSoftmaxLoss, ClassBalancedLoss,
                           class_balanced_background_weight, class_balanced_weights,
                           group_by_count)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ class-balanced loss

def ref_cb_weights(counts, beta):
    """Cui et al. eq. 3: E_n = (1 - beta^n) / (1 - beta); w = 1 / E_n scaled to sum to C."""
    inv = [(1 - beta) / (1 - beta ** max(n, 1)) for n in counts]
    return [w * len(counts) / sum(inv) for w in inv]


def ref_cb_loss(z, labels, weights, form, background_weight=1.0, gamma=0.0):
    """eq. 4 (softmax) and eq. 5 / 6 (sigmoid, focal) weighted by w_y, summed over samples
    and divided by N."""
    n, k = z.shape
    c = len(weights)
    total = z.new_zeros(())
    for i in range(n):
        y = labels[i]
        if y == -1:
            continue
        w = background_weight if y == c else weights[y]
        if form == "softmax":
            total = total + w * (torch.logsumexp(z[i], 0) - z[i, y])
            continue
        for j in range(c):
            p = torch.sigmoid(z[i, j])
            p_t = p if j == y else 1 - p
            total = total - w * (1 - p_t) ** gamma * torch.log(p_t)
    return total / n


def test_cb_weights_are_the_inverse_effective_number_summing_to_c():
    counts = [0, 1, 3, 10, 250, 4000]
    for beta in (0.0, 0.9, 0.999, 0.9999):
        w = class_balanced_weights(counts, beta).double()
        torch.testing.assert_close(w, torch.tensor(ref_cb_weights(counts, beta),
                                                   dtype=torch.float64), rtol=1e-6, atol=0)
        assert math.isclose(float(w.sum()), len(counts), rel_tol=1e-6)
    # beta 0: every class alike; beta -> 1: inverse frequency (n = 1 vs 10: 10x)
    assert torch.allclose(class_balanced_weights(counts, 0.0), torch.ones(6))
    w = class_balanced_weights([1, 10], 1 - 1e-9)
    assert math.isclose(float(w[0] / w[1]), 10.0, rel_tol=1e-4)
    with pytest.raises(ValueError, match="beta must be < 1"):
        class_balanced_weights(counts, 1.0)
    with pytest.raises(ValueError, match="counts values must be in"):
        class_balanced_weights([3, -1], 0.9)


@pytest.mark.parametrize("form,background,gamma", [
    ("softmax", False, 0.0),   # image classification: [N, C], labels 0..C-1
    ("softmax", True, 0.0),    # two-stage head: [N, C + 1], label C = background
    ("sigmoid", True, 0.0),    # [N, C], label C = negative of every class
    ("sigmoid", True, 2.0),    # class-balanced focal loss
])
def test_cb_loss_matches_the_papers_equations(form, background, gamma):
    torch.manual_seed(0)
    c, n = 5, 23
    weights = ref_cb_weights([1, 4, 30, 200, 5000], 0.99)
    width = c + 1 if (form == "softmax" and background) else c
    z = (3 * torch.randn(n, width, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, c + 1 if background else c, (n,))
    if form == "sigmoid":
        labels[:3] = -1  # ignored rows, as dense heads give them
    loss = ClassBalancedLoss(weights, form=form, background_weight=0.7, gamma=gamma)(z, labels)
    ref = ref_cb_loss(z, labels.tolist(), weights, form, 0.7, gamma)
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-6, atol=1e-9)
    g, = torch.autograd.grad(loss, z)
    g_ref, = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-9)


def test_cb_loss_gradcheck_and_avg_factor():
    torch.manual_seed(1)
    labels = torch.tensor([0, 3, 2, 3, 1])
    for form, width in (("softmax", 4), ("sigmoid", 3)):
        loss = ClassBalancedLoss([0.5, 1.0, 1.5], form=form, gamma=1.5 if form == "sigmoid" else 0)
        z = torch.randn(5, width, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: loss(x, labels, avg_factor=2.0), (z,))
        torch.testing.assert_close(loss(z, labels, avg_factor=2.0) * 2, loss(z, labels) * 5)


def test_cb_loss_rejects_bad_input():
    loss = ClassBalancedLoss([1.0, 2.0], form="softmax")
    with pytest.raises(ValueError, match=r"logits must have shape \[N, C\+1"):
        loss(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        loss(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="form must be one of"):
        ClassBalancedLoss([1.0], form="tanh")
    with pytest.raises(ValueError, match="sigmoid form only"):
        ClassBalancedLoss([1.0], form="softmax", gamma=2.0)


# ------------------------------------------------------------------------ BAGS

GROUP_OF = [1, 1, 2, 3, 2, 4, 1]  # C = 7 categories in G = 4 groups
C, G = len(GROUP_OF), 4


def ref_group_members(n):
    return [j for j, g in enumerate(GROUP_OF) if g == n]


def ref_others_column(n):
    return C + 1 + n


def ref_group_target(y, n):
    """Column of sample y's target in group n (paper sec. 3.3): group 0 [bg, fg]; group n
    its own category, or "others" for the background and every other group's category."""
    if n == 0:
        return C if y == C else C + 1
    return y if (y < C and GROUP_OF[y] == n) else ref_others_column(n)


def ref_bags_loss(z, labels, rows):
    """Sum over groups of the softmax CE within the group; group 0 over every sample divided
    by N, group n over `rows[n]` (its positives and sampled "others") divided by their
    number."""
    n_rows = z.shape[0]
    total = z.new_zeros(())
    group0 = [C, C + 1]
    for i in range(n_rows):
        total = total + (torch.logsumexp(z[i, group0], 0) - z[i, ref_group_target(labels[i], 0)]
                         ) / n_rows
    for n in range(1, G + 1):
        cols = [ref_others_column(n)] + ref_group_members(n)
        chosen = rows[n]
        for i in chosen:
            total = total + (torch.logsumexp(z[i, cols], 0) - z[i, ref_group_target(labels[i], n)]
                             ) / max(len(chosen), 1)
    return total


def ref_bags_scores(z):
    """Authors' calibration: p_j = p^0_fg * softmax within j's group (its "others" kept in
    the normaliser, not returned)."""
    out = torch.zeros(z.shape[0], C, dtype=z.dtype)
    for i in range(z.shape[0]):
        fg = torch.exp(z[i, C + 1]) / (torch.exp(z[i, C]) + torch.exp(z[i, C + 1]))
        for j in range(C):
            cols = [ref_others_column(GROUP_OF[j])] + ref_group_members(GROUP_OF[j])
            out[i, j] = fg * torch.exp(z[i, j]) / sum(torch.exp(z[i, k]) for k in cols)
    return out


def _bags_batch(seed, n=40):
    torch.manual_seed(seed)
    z = (2 * torch.randn(n, C + 2 + G, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, C + 1, (n,))
    labels[:12] = C  # a background-heavy batch, as sampled proposals are
    return z, labels


def test_bags_groups_follow_the_papers_bins():
    got = group_by_count([0, 1, 9, 10, 99, 100, 999, 1000, 50000])
    assert got.tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="increasing"):
        group_by_count([1, 2], edges=(100, 10))


def test_bags_others_targets():
    loss = BalancedGroupSoftmaxLoss(GROUP_OF, G)
    labels = torch.arange(C + 1)
    targets = loss.group_targets(labels)
    for y in range(C + 1):
        for n in range(G + 1):
            cols = [C, C + 1] if n == 0 else [ref_others_column(n)] + ref_group_members(n)
            assert cols[int(targets[y, n])] == ref_group_target(y, n), (y, n)


def test_bags_loss_without_sampling_matches_the_reference():
    z, labels = _bags_batch(0)
    loss = BalancedGroupSoftmaxLoss(GROUP_OF, G, others_sample_ratio=0.0)(z, labels)
    lab = labels.tolist()
    # with every "others" sample kept, a group with a positive takes every row; a group
    # without one takes none
    rows = {n: (list(range(len(lab))) if any(y < C and GROUP_OF[y] == n for y in lab) else [])
            for n in range(1, G + 1)}
    ref = ref_bags_loss(z, lab, rows)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    g, = torch.autograd.grad(loss, z)
    g_ref, = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 8.0])
def test_bags_others_sampling_counts_and_loss(ratio):
    z, labels = _bags_batch(3)
    bags = BalancedGroupSoftmaxLoss(GROUP_OF, G, others_sample_ratio=ratio)
    lab = labels.tolist()
    torch.manual_seed(11)
    loss = bags(z, labels)
    torch.manual_seed(11)
    mask = bags.sample_mask(bags.group_targets(labels))
    assert mask[:, 0].all()
    rows = {}
    for n in range(1, G + 1):
        pos = [i for i, y in enumerate(lab) if y < C and GROUP_OF[y] == n]
        others = [i for i, y in enumerate(lab) if not (y < C and GROUP_OF[y] == n)]
        chosen = torch.nonzero(mask[:, n]).flatten().tolist()
        assert set(pos) <= set(chosen)
        assert len(chosen) - len(pos) == min(math.floor(ratio * len(pos)), len(others))
        rows[n] = chosen
    torch.testing.assert_close(loss, ref_bags_loss(z, lab, rows), rtol=1e-9, atol=1e-12)


def test_bags_others_draw_is_uniform():
    # one positive of group 1 among 1 + 9 "others": 2 drawn of 9, each with probability 2/9
    labels = torch.tensor([0] + [C] * 9)
    bags = BalancedGroupSoftmaxLoss(GROUP_OF, G, others_sample_ratio=2.0)
    targets = bags.group_targets(labels)
    torch.manual_seed(0)
    draws = 4000
    hits = sum(bags.sample_mask(targets)[1:, 1].long() for _ in range(draws)).double()
    p = 2.0 / 9.0
    # 6 standard deviations of a binomial count: a false failure has probability < 1e-8
    assert ((hits - draws * p).abs() <= 6 * math.sqrt(draws * p * (1 - p))).all(), hits


def test_bags_inference_calibration_matches_the_reference():
    z, _ = _bags_batch(5, n=9)
    scores = BalancedGroupSoftmaxLoss(GROUP_OF, G).scores(z.detach())
    torch.testing.assert_close(scores, ref_bags_scores(z.detach()), rtol=1e-9, atol=1e-12)
    # within a group, the categories and its "others" share the foreground probability
    fg = torch.softmax(z.detach()[:, C:C + 2], 1)[:, 1]
    for n in range(1, G + 1):
        members = ref_group_members(n)
        others = torch.softmax(z.detach()[:, [ref_others_column(n)] + members], 1)[:, 0]
        torch.testing.assert_close(scores[:, members].sum(1) + fg * others, fg)


def test_bags_gradcheck():
    z, labels = _bags_batch(7, n=12)
    bags = BalancedGroupSoftmaxLoss(GROUP_OF, G, others_sample_ratio=1.0)

    def f(x):
        torch.manual_seed(2)  # the same "others" draw at every evaluation
        return bags(x, labels, avg_factor=5.0)

    assert torch.autograd.gradcheck(f, (z.detach().requires_grad_(),))


def test_bags_groups_come_back_from_a_state_dict():
    bags = BalancedGroupSoftmaxLoss(GROUP_OF, G)
    other = BalancedGroupSoftmaxLoss([1] * C, G)
    other.load_state_dict(bags.state_dict())
    z, _ = _bags_batch(1, n=4)
    torch.testing.assert_close(other.scores(z.detach()), bags.scores(z.detach()))
    with pytest.raises(ValueError, match=r"groups must be in 1..4"):
        BalancedGroupSoftmaxLoss([0, 1], G)
    with pytest.raises(ValueError, match=r"logits must have shape \[N, C\+2\+G\]"):
        bags(torch.zeros(2, C + 1), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------- no host synchronisation

from test_no_host_sync import device_tensors, recorded_host_reads  # noqa: E402,F401 (fixture)


@pytest.mark.parametrize("case", ["cb softmax", "cb sigmoid focal", "bags"])
def test_training_step_reads_nothing_back(device_tensors, case):
    z, labels = _bags_batch(4)
    if case == "bags":
        loss_fn, z = BalancedGroupSoftmaxLoss(GROUP_OF, G), z.detach()
    else:
        form = case.split()[1]
        loss_fn = ClassBalancedLoss([1.0] * C, form=form, gamma=2.0 if form == "sigmoid" else 0)
        z = z.detach()[:, :C + 1 if form == "softmax" else C]
    avg = torch.tensor(7.0)  # a device tensor in these tests: passed on, not read
    with recorded_host_reads() as calls:
        zz = z.clone().requires_grad_()
        loss_fn(zz, labels, avg_factor=avg).backward()
    assert not calls, calls
    assert torch.isfinite(zz.grad).all()


def test_background_as_a_class_of_unlimited_samples_takes_the_classes_normalisation():
    counts = [0, 1, 3, 10, 250, 4000]
    for beta in (0.9, 0.999):
        inv = [(1 - beta) / (1 - beta ** max(n, 1)) for n in counts]
        # E_n -> 1 / (1 - beta): w = (1 - beta), scaled as the classes are (to sum C)
        expected = (1 - beta) * len(counts) / sum(inv)
        assert math.isclose(class_balanced_background_weight(counts, beta), expected,
                            rel_tol=1e-12)
        # the limit of a class weight: a class of 10^6 images weighs it (relative to the rest)
        w = ref_cb_weights(counts + [10 ** 6], beta)
        assert math.isclose(w[-1] / w[0], expected / ref_cb_weights(counts, beta)[0],
                            rel_tol=1e-9)
        # every class weighs at least the background, the largest class close to it
        w = class_balanced_weights(counts, beta)
        assert float(w.min()) >= expected * (1 - 1e-6)
    assert math.isclose(class_balanced_background_weight(counts, 0.0), 1.0, rel_tol=1e-12)


# ------------------------------------------------- registered losses: counts from the data

def test_registered_losses_take_their_counts_from_the_training_metadata():
    from detectron2.data import MetadataCatalog

    from eql_d2.config import get_eql_cfg
    from eql_d2.modeling.cls_losses import BAGS, ClassBalanced

    counts = [0, 3, 9, 10, 150, 999, 1000, 2400]
    name = "cb_bags_test_train"
    MetadataCatalog.get(name).set(
        thing_classes=[f"c{j}" for j in range(len(counts))], num_train_images=2500,
        class_image_count=[{"id": j + 1, "image_count": n} for j, n in enumerate(counts)])
    cfg = get_eql_cfg(opts=["MODEL.CLS_LOSS.CLASS_BALANCED.BETA", "0.99"])
    cb = ClassBalanced(**ClassBalanced.from_config(cfg, len(counts), (name,)))
    torch.testing.assert_close(cb.weights, class_balanced_weights(counts, 0.99))
    bags = BAGS(**BAGS.from_config(cfg, len(counts), (name,)))
    assert bags.groups.tolist() == group_by_count(counts).tolist() == [1, 1, 1, 2, 3, 3, 4, 4]
    assert bags.extra_columns == 2 + 4
    # built for inference (no metadata): the checkpoint's groups and weights are taken
    blind_cb, blind_bags = ClassBalanced(len(counts)), BAGS(len(counts))
    with pytest.raises(ValueError, match="ClassBalanced cannot train"):
        blind_cb.check_trainable()
    blind_cb.load_state_dict(cb.state_dict())
    blind_bags.load_state_dict(bags.state_dict())
    blind_cb.check_trainable()
    blind_bags.check_trainable()
    assert torch.equal(blind_cb.weights, cb.weights)
    assert torch.equal(blind_bags.groups, bags.groups)


def test_registered_class_balanced_loss_in_every_head_kind():
    from eql_d2.config import get_eql_cfg
    from eql_d2.modeling.cls_losses import ClassBalanced, build_cls_loss

    counts = [1, 5, 50, 500]
    torch.manual_seed(0)
    for form in ("softmax", "sigmoid"):
        loss = ClassBalanced(4, counts=counts, form=form)
        ref = ClassBalancedLoss(class_balanced_weights(counts, 0.999), form=form)
        # image classification: [N, C] logits, labels 0..C-1
        z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 3, 1])
        torch.testing.assert_close(loss.head_loss(z, y, 6.0), ref(z, y))
        assert loss.scores(z).shape == (6, 4)
    cfg = get_eql_cfg(opts=["MODEL.META_ARCHITECTURE", "ATSS", "MODEL.CLS_LOSS.NAME",
                            "ClassBalanced", "MODEL.CLS_LOSS.CLASS_BALANCED.FORM", "softmax"])
    with pytest.raises(ValueError, match="FORM softmax needs a background column"):
        build_cls_loss(cfg, 4, "dense")
    # background as a class: its samples (label C) weigh the closed-form background weight
    loss = ClassBalanced(4, counts=counts, form="sigmoid", background_as_class=True)
    bg = class_balanced_background_weight(counts, 0.999)
    assert 0 < bg < float(loss.weights.min())
    with pytest.raises(ValueError, match="BACKGROUND_WEIGHT = 0.5 with BACKGROUND_AS_CLASS"):
        ClassBalanced(4, counts=counts, background_weight=0.5, background_as_class=True)
    z, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 4, 4, 2, 3, 4, 1])
    torch.testing.assert_close(loss.head_loss(z, y, 7.0), ref_cb_loss(
        z, y.tolist(), loss.weights.double().tolist(), "sigmoid", background_weight=bg))
