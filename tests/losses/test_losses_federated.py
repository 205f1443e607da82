"""Tests of eql_d2.losses.FederatedLoss: the sampled class set, its distribution, the loss
against a brute-force loop over the sampled columns, and the checkpointed counts."""

import itertools
import math

import pytest
import torch

from eql_d2.losses import FederatedLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def counts_for(c, seed=0):
    """Image counts [C] with a long tail; about a fifth of them are 0."""
    g = torch.Generator().manual_seed(seed)
    return (1000 * torch.rand(c, generator=g) ** 4).floor()


def labels_with(positives, c, n_bg=20, seed=0):
    """Labels [N]: each class of ``positives`` once or twice, plus n_bg background rows."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.tensor(sorted(positives), dtype=torch.long)
    rows = torch.cat([pos, pos[: len(pos) // 2], torch.full((n_bg,), c)])
    return rows[torch.randperm(rows.numel(), generator=g)]


@pytest.mark.parametrize("c,k,num_pos", [(200, 50, 0), (200, 50, 10), (200, 50, 50),
                                         (200, 50, 73), (200, 7, 3), (30, 50, 5),
                                         (200, 50, 200)])
def test_sampled_set_size_and_positives(c, k, num_pos):
    loss_fn = FederatedLoss(c, counts_for(c), num_classes_sampled=k)
    g = torch.Generator().manual_seed(num_pos)
    for trial in range(5):
        positives = torch.randperm(c, generator=g)[:num_pos].tolist()
        labels = labels_with(positives, c, seed=trial)
        sampled = loss_fn.sample_classes(labels)
        assert sampled.dtype == torch.bool and sampled.shape == (c,)
        # background rows are in the batch and take none of the K places
        assert int(sampled.sum()) == min(max(k, num_pos), c)
        assert bool(sampled[positives].all())
        if num_pos >= k:
            assert sampled.nonzero().flatten().tolist() == sorted(positives)


def test_zero_count_classes_only_after_every_weighted_class():
    c = 100
    counts = counts_for(c)
    zero = (counts == 0).nonzero().flatten()
    weighted = c - zero.numel()
    assert 5 <= zero.numel() <= 40
    seen = torch.zeros(c, dtype=torch.long)
    for k in (weighted - 10, weighted + 3):
        loss_fn = FederatedLoss(c, counts, num_classes_sampled=k)
        for seed in range(30):
            torch.manual_seed(seed)
            sampled = loss_fn.sample_classes(torch.tensor([c, c]))  # background only
            assert int(sampled.sum()) == k
            if k < weighted:
                assert not bool(sampled[zero].any())
            else:
                assert bool(sampled[counts > 0].all())
                seen += sampled.long()
    # the 3 zero-weight places are drawn at random among the zero-weight classes
    assert int((seen[zero] > 0).sum()) > 3


def exact_inclusion(weights, k):
    """P(j in the first k of a sequential weighted draw without replacement), by enumerating
    every ordered sequence of k classes."""
    c = len(weights)
    prob = [0.0] * c
    for seq in itertools.permutations(range(c), k):
        p, left = 1.0, sum(weights)
        for j in seq:
            p *= weights[j] / left
            left -= weights[j]
        for j in seq:
            prob[j] += p
    return prob


@pytest.mark.parametrize("power", [0.5, 0.0, 1.0])
def test_draw_follows_frequency_power_weights(power):
    # counts 1, 4, ..., 49: with power 0.5 the weights are 1..7. Class 2 is a positive, so
    # K - 1 = 3 classes are drawn from the other six.
    counts = torch.tensor([float(i * i) for i in range(1, 8)])
    loss_fn = FederatedLoss(7, counts, num_classes_sampled=4, freq_weight_power=power,
                            generator=torch.Generator().manual_seed(123))
    others = [0, 1, 3, 4, 5, 6]
    expected = exact_inclusion([counts[j].item() ** power for j in others], 3)
    n = 3000
    labels = torch.tensor([2, 7, 7])
    hits = torch.zeros(7)
    for _ in range(n):
        hits += loss_fn.sample_classes(labels).float()
    assert hits[2] == n
    freq = hits[others] / n
    for f, p in zip(freq.tolist(), expected):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(f - p) < 4.5 * sigma, (freq, expected)
    if power > 0:  # inclusion frequencies ordered like the weights
        assert torch.equal(freq.argsort(), torch.arange(6))


def test_global_rng_and_generator_reproducibility():
    c = 300
    loss_fn = FederatedLoss(c, counts_for(c))
    labels = labels_with([5, 17], c)
    torch.manual_seed(7)
    a = loss_fn.sample_classes(labels)
    torch.manual_seed(7)
    b = loss_fn.sample_classes(labels)
    c_ = loss_fn.sample_classes(labels)
    assert torch.equal(a, b) and not torch.equal(b, c_)
    gen = torch.Generator().manual_seed(5)
    with_gen = FederatedLoss(c, counts_for(c), generator=gen)
    state = torch.get_rng_state()
    d = with_gen.sample_classes(labels)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed
    gen.manual_seed(5)
    assert torch.equal(with_gen.sample_classes(labels), d)


def brute_force_loss(z, labels, sampled):
    """sum over rows i and sampled columns j of BCE(z_ij, [labels_i == j]) / N, one term at a
    time (softplus(z) - y z), with autograd to z."""
    n = z.shape[0]
    total = z.new_zeros(())
    for i in range(n):
        for j in sampled:
            y = 1.0 if labels[i] == j else 0.0
            zij = z[i, j]
            total = total + torch.clamp(zij, min=0) - y * zij + torch.log1p(torch.exp(-zij.abs()))
    return total / n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_matches_brute_force_and_gradient_only_on_sampled_columns(dtype):
    c, n = 40, 16
    gen = torch.Generator().manual_seed(0)
    loss_fn = FederatedLoss(c, counts_for(c, seed=1), num_classes_sampled=9, generator=gen)
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(n, c + 1, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.tensor([3, 40, 11, 3, 40, 40, 25, 11, 40, 0, 40, 40, 39, 40, 40, 3])
    gen.manual_seed(99)
    sampled = loss_fn.sample_classes(labels)
    gen.manual_seed(99)  # forward draws the same set
    zz = z.clone().requires_grad_()
    loss = loss_fn(zz, labels)
    loss.backward()
    cols = sampled.nonzero().flatten().tolist()
    assert len(cols) == 9 and {0, 3, 11, 25, 39} <= set(cols)
    zr = z.double().requires_grad_()
    ref = brute_force_loss(zr, labels.tolist(), cols)
    ref.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert abs(loss.item() - ref.item()) <= tol * ref.item()
    torch.testing.assert_close(zz.grad.double(), zr.grad, rtol=tol, atol=tol * 1e-2)
    unsampled = torch.ones(c + 1, dtype=torch.bool)
    unsampled[cols] = False
    assert unsampled[c]  # the background column is never trained
    assert torch.equal(zz.grad[:, unsampled], torch.zeros_like(zz.grad[:, unsampled]))
    assert (zz.grad[:, cols] != 0).all()


def test_gradcheck_float64():
    c = 8
    gen = torch.Generator()
    loss_fn = FederatedLoss(c, counts_for(c, seed=4) + 1, num_classes_sampled=4, generator=gen)
    labels = torch.tensor([1, 8, 6, 8, 1])

    def fn(z):
        gen.manual_seed(3)  # the same sampled set at every evaluation
        return loss_fn(z, labels)

    z = (torch.randn(5, c + 1, generator=torch.Generator().manual_seed(5),
                     dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_counts_are_saved_and_unknown_counts_come_from_a_checkpoint():
    counts = counts_for(6) + 1
    trained = FederatedLoss(6, counts)
    state = trained.state_dict()
    assert set(state) == {"class_image_count"} and torch.equal(state["class_image_count"],
                                                                counts)
    fresh = FederatedLoss(6)  # inference build: no dataset
    assert not fresh.counts_known
    labels = torch.tensor([0, 6])
    with pytest.raises(ValueError, match="class_image_count"):
        fresh(torch.randn(2, 7), labels)
    torch.testing.assert_close(fresh.scores(torch.zeros(2, 7)), torch.full((2, 6), 0.5))
    fresh.load_state_dict(state)
    assert fresh.counts_known and torch.equal(fresh.class_image_count, counts)
    fresh(torch.randn(2, 7), labels)
    # A checkpoint saved while the counts were unknown does not erase known ones.
    trained.load_state_dict(FederatedLoss(6).state_dict())
    assert trained.counts_known and torch.equal(trained.class_image_count, counts)
    # A checkpoint without the key (another loss) keeps what the module has, with a warning.
    with pytest.warns(UserWarning, match="class_image_count"):
        result = trained.load_state_dict({}, strict=True)
    assert result.missing_keys == [] and torch.equal(trained.class_image_count, counts)
    with pytest.raises(RuntimeError, match="class_image_count"):
        trained.load_state_dict({"class_image_count": -counts})
    assert torch.equal(trained.class_image_count, counts)


def test_scores_empty_batch_and_half_precision():
    c = 5
    loss_fn = FederatedLoss(c, torch.ones(c))
    z = torch.randn(4, c + 1)
    torch.testing.assert_close(loss_fn.scores(z), torch.sigmoid(z[:, :c]))
    empty = torch.zeros(0, c + 1, requires_grad=True)
    loss = loss_fn(empty, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, c + 1)
    # C <= K: every class is sampled, so the loss is sigmoid CE over the C columns
    labels = torch.tensor([0, 5, 3, 5])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        z[:, :c], torch.nn.functional.one_hot(labels, c + 1)[:, :c].float(),
        reduction="sum") / 4
    torch.testing.assert_close(loss_fn(z, labels), ref)
    zb = z.bfloat16().requires_grad_()
    lb = loss_fn(zb, labels)
    lb.backward()
    assert lb.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16
    assert abs(lb.item() - ref.item()) < 2e-2 * ref.item()


def _fed4(z, labels):
    return FederatedLoss(4, torch.ones(4))(z, torch.tensor(labels))


@pytest.mark.parametrize("name,call", [
    ("logits", lambda: _fed4(torch.randn(3, 4), [0, 1, 4])),  # C columns, not C + 1
    ("labels", lambda: _fed4(torch.randn(3, 5), [0, 1, 5])),
    ("labels", lambda: _fed4(torch.randn(3, 5), [0, -1, 4])),
    ("logits", lambda: _fed4(torch.full((3, 5), math.nan), [0, 1, 4])),
    ("class_image_count", lambda: FederatedLoss(4, torch.ones(5))),
    ("class_image_count", lambda: FederatedLoss(4, torch.tensor([1.0, -1.0, 2.0, 3.0]))),
    ("class_image_count", lambda: FederatedLoss(4, torch.zeros(4))),
    ("num_classes_sampled", lambda: FederatedLoss(4, torch.ones(4), num_classes_sampled=0)),
    ("num_classes_sampled", lambda: FederatedLoss(4, torch.ones(4), num_classes_sampled=5.0)),
    ("freq_weight_power", lambda: FederatedLoss(4, torch.ones(4), freq_weight_power=-0.5)),
    ("generator", lambda: FederatedLoss(4, torch.ones(4), generator=1)),
    ("num_classes", lambda: FederatedLoss(0, torch.ones(1))),
])
def test_bad_input_raises_value_error_naming_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_training_step_reads_nothing_back(monkeypatch):
    """As for a CUDA tensor: no value read on the host, no unique / nonzero / mask indexing,
    so the draw and the loss queue without waiting for the device."""
    from eql_d2.losses import _checks
    from test_no_host_sync import recorded_host_reads

    monkeypatch.setattr(_checks, "_values_on_host", lambda t: False)
    monkeypatch.delenv(_checks.DEBUG_CHECKS_ENV, raising=False)
    c = 60
    loss_fn = FederatedLoss(c, counts_for(c), num_classes_sampled=20)
    labels = labels_with([4, 9, 33], c)
    z = torch.randn(labels.numel(), c + 1)
    loss_fn(z.clone().requires_grad_(), labels).backward()  # lazy set-up outside
    with recorded_host_reads() as calls:
        zz = z.clone().requires_grad_()
        loss_fn(zz, labels).backward()
    assert not calls, calls
    assert int((zz.grad[:, :c] != 0).any(0).sum()) == 20
