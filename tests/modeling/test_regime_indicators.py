"""Regime indicators (eql_d2.modeling.regime): counts and gradient sums per category against a
brute-force reference, training unchanged, float16, workers, and what train_net.py writes."""

import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, TINY_ONE_STAGE, TINY_RCNN, run_on_gloo_workers, run_train_net
from eql_d2.engine.hooks import RegimeIndicatorWriter
from eql_d2.modeling.regime import RegimeIndicators

C = 5


def _batch(n=40, k=C + 1, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    # -1 ignored, 0..C-1 categories, C background (some rows of each)
    labels = torch.randint(-1, C + 1, (n,), generator=g)
    weights = torch.rand(n, C, generator=g, dtype=torch.float64)
    return logits, labels, weights


def _loss(logits, labels, weights):
    """A weighted sigmoid loss over the C category columns (column C is extra, as a
    two-stage head's background column), ignored rows out."""
    valid = labels >= 0
    target = F.one_hot(labels.clamp(0, C), C + 1)[:, :C].to(logits.dtype)
    per = F.binary_cross_entropy_with_logits(logits[:, :C], target, reduction="none")
    return (per * weights * valid[:, None]).sum() / 7.0 + logits[:, C].sigmoid().sum()


def _brute_force(logits, labels, weights):
    z = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_loss(z, labels, weights), z)
    ref = {n: torch.zeros(C, dtype=torch.float64) for n in RegimeIndicators._STAT_NAMES}
    for i in range(len(labels)):
        if labels[i] < 0:
            continue
        for j in range(C):
            kind = "pos" if labels[i] == j else "neg"
            ref[f"{kind}_count"][j] += 1
            ref[f"{kind}_grad"][j] += abs(grad[i, j].item())
    return ref


def test_counts_and_gradient_sums_equal_a_brute_force_reference():
    reg = RegimeIndicators(C).train()
    ref = {n: torch.zeros(C, dtype=torch.float64) for n in RegimeIndicators._STAT_NAMES}
    for seed in (0, 1):  # two steps accumulate
        logits, labels, weights = _batch(seed=seed)
        z = logits.clone().requires_grad_(True)
        reg.observe(_loss(z, labels, weights), z, labels)
        for n, v in _brute_force(logits, labels, weights).items():
            ref[n] += v
    for n in RegimeIndicators._STAT_NAMES:
        torch.testing.assert_close(getattr(reg, n), ref[n], rtol=1e-12, atol=1e-15)
    # every non-ignored row is positive or negative for each category
    valid = sum(int((_batch(seed=s)[1] >= 0).sum()) for s in (0, 1))
    assert torch.equal(reg.pos_count + reg.neg_count, torch.full((C,), float(valid),
                                                                 dtype=torch.float64))
    ratio = reg.gradient_ratio
    torch.testing.assert_close(ratio, ref["pos_grad"] / ref["neg_grad"])


def test_training_gradient_is_unchanged_and_eval_observes_nothing():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, C + 1).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    _, labels, weights = _batch()
    grads = []
    for observe in (False, True):
        layer.zero_grad()
        logits = layer(x)
        loss = _loss(logits, labels, weights)
        reg = RegimeIndicators(C).train()
        if observe:
            reg.observe(loss, logits, labels)
            assert reg.pos_count.sum() > 0
        loss.backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    reg = RegimeIndicators(C).eval()
    logits = layer(x)
    reg.observe(_loss(logits, labels, weights), logits, labels)
    assert reg.pos_count.sum() == 0 and reg.neg_grad.sum() == 0


def test_float16_logits_keep_gradients_below_the_float16_range():
    # p = 0.001 on every entry; each negative's gradient is p * 1e-5 = 1e-8, under float16's
    # smallest subnormal (6e-8), so an unscaled float16 gradient would be all zeros.
    n = 64
    logits = torch.full((n, C), -6.9068, dtype=torch.float16, requires_grad=True)
    labels = torch.arange(n) % (C + 1)

    def loss_of(z):
        target = F.one_hot(labels, C + 1)[:, :C].float()
        neg = (1 - target) * F.binary_cross_entropy_with_logits(z.float(), target,
                                                                 reduction="none")
        return neg.sum() * 1e-5

    assert torch.autograd.grad(loss_of(logits), logits)[0].abs().max() == 0
    reg = RegimeIndicators(C).train()
    reg.observe(loss_of(logits), logits, labels)
    p = torch.sigmoid(torch.tensor(-6.9068, dtype=torch.float16).double())
    negatives = n - torch.bincount(labels, minlength=C + 1)[:C].double()
    torch.testing.assert_close(reg.neg_grad, negatives * p * 1e-5, rtol=2e-3, atol=0)


def _worker_steps(rows, world=1):
    """Two steps of a loss normalized over the global batch as the dense heads do (each
    worker: its rows' sum / (global normalizer / workers))."""
    reg = RegimeIndicators(C).train()
    for seed in (0, 1):
        logits, labels, weights = _batch(n=40, seed=seed)
        z = logits[rows].clone().requires_grad_(True)
        loss = _loss(z, labels[rows], weights[rows]) * world
        reg.observe(loss, z, labels[rows])
    return {n: getattr(reg, n).clone() for n in RegimeIndicators._STAT_NAMES}


def test_two_workers_with_half_batches_equal_one_process_on_the_whole_batch():
    ranks = run_on_gloo_workers(_worker_steps, 40, world_size=2, world=2)
    whole = _worker_steps(slice(0, 40))
    for n in RegimeIndicators._STAT_NAMES:
        assert torch.equal(ranks[0][n], ranks[1][n])
        torch.testing.assert_close(ranks[0][n], whole[n], rtol=1e-12, atol=1e-15)


def test_old_checkpoint_without_indicators_loads_with_a_warning():
    reg = RegimeIndicators(C)
    reg.pos_count += 3
    holder = torch.nn.Module()
    holder.regime = reg
    with pytest.warns(UserWarning, match="no regime indicators"):
        result = holder.load_state_dict({}, strict=False)
    assert not result.missing_keys and reg.pos_count.sum() == 0


def test_writer_drops_lines_after_the_checkpoint_a_run_resumes_from(tmp_path):
    writer = RegimeIndicatorWriter(1, str(tmp_path))
    model = torch.nn.Module()
    model.regime = RegimeIndicators(C)
    writer.trainer = types.SimpleNamespace(model=model, start_iter=0, iter=0, max_iter=4)
    for it in range(4):
        model.regime.pos_count += 1
        writer.trainer.iter = it
        writer.after_step()
    rows = [json.loads(line) for line in open(writer.path)]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["heads"]["regime"]["pos_count"] == [4.0] * C
    writer.trainer.start_iter = 2  # a resumed run starts after iteration 2's checkpoint
    writer.before_train()
    assert [json.loads(line)["iteration"] for line in open(writer.path)] == [1, 2]


@pytest.mark.parametrize("config,tiny,head", [
    ("configs/Synthetic-LT/atss_R18_FPN_focal.yaml", TINY_ONE_STAGE, "cls_loss.regime"),
    ("configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_sigmoid.yaml", TINY_RCNN,
     "roi_heads.box_predictor.regime"),
])
def test_baseline_runs_write_indicators_equal_to_their_checkpoint(small_synthetic, tmp_path,
                                                                  config, tiny, head):
    out = str(tmp_path)
    proc = run_train_net(["--config-file", os.path.join(ROOT, config), *tiny,
                          "MODEL.CLS_LOSS.REGIME_INDICATORS", "True",
                          "MODEL.CLS_LOSS.LOG_PERIOD", "2", "DATASETS.TEST", "()",
                          "OUTPUT_DIR", out],
                         {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "regime_indicators.jsonl"))]
    assert [r["iteration"] for r in rows] == [2, 3]  # every PERIOD and the last iteration
    assert rows[-1]["class_frequency"] == ["f", "f", "f", "c", "c", "c", "r", "r"]
    state = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                       weights_only=False)["model"]
    last = rows[-1]["heads"][head]
    for n in RegimeIndicators._STAT_NAMES:
        assert last[n] == state[f"{head}.{n}"].tolist()
    total = [p + q for p, q in zip(last["pos_count"], last["neg_count"])]
    assert len(set(total)) == 1 and sum(last["pos_count"]) > 0
    assert sum(last["neg_grad"]) > 0
    for a, b in zip(rows[0]["heads"][head]["pos_count"], last["pos_count"]):
        assert a <= b


def _snapshot(iteration, pos_count, neg_count, pos_grad, neg_grad, groups):
    return {"iteration": iteration, "class_frequency": groups,
            "heads": {"h": {"pos_count": pos_count, "neg_count": neg_count,
                            "pos_grad": pos_grad, "neg_grad": neg_grad}}}


def test_group_summary_and_window_difference_on_a_hand_built_run(tmp_path):
    from eql_d2.evaluation.regime import difference, group_summary, read_regime_indicators

    groups = ["r", "r", "r", "c", "f"]
    early = _snapshot(10, [0, 1, 1, 5, 9], [10, 9, 9, 5, 1], [0, 2.0, 1.0, 3.0, 4.0],
                      [0.5, 1.0, 4.0, 3.0, 2.0], groups)
    late = _snapshot(20, [0, 2, 3, 9, 19], [20, 18, 17, 11, 1], [0, 2.5, 1.5, 4.0, 5.0],
                     [1.0, 2.0, 8.0, 5.0, 2.0], groups)
    s = group_summary(late)
    # rare: category 0 never had a positive and is not "seen"; g = 1.25 and 0.1875
    assert (s["r"]["categories"], s["r"]["seen"], s["r"]["below_1"]) == (3, 2, 1)
    assert s["r"]["median_g"] == pytest.approx((2.5 / 2.0 + 1.5 / 8.0) / 2)
    assert s["r"]["min_g"] == pytest.approx(1.5 / 8.0)
    assert s["r"]["median_pos_neg"] == pytest.approx((2 / 18 + 3 / 17) / 2)
    assert s["c"]["median_g"] == pytest.approx(0.8) and s["f"]["below_1"] == 0
    w = group_summary(difference(late, early))
    # over iterations 10-20: rare g = 0.5 / 1 and 0.5 / 4; frequent has no new negatives
    assert w["r"]["median_g"] == pytest.approx((0.5 + 0.125) / 2)
    assert w["f"]["median_g"] == float("inf")
    with pytest.raises(ValueError, match="not before"):
        difference(early, late)
    path = tmp_path / "regime_indicators.jsonl"
    path.write_text(json.dumps(late) + "\n" + json.dumps(early) + "\n")
    assert [r["iteration"] for r in read_regime_indicators(str(tmp_path))] == [10, 20]


def test_since_takes_the_window_from_the_last_snapshot_at_or_before_the_start():
    from eql_d2.evaluation.regime import since

    groups = ["r", "f"]
    snaps = [_snapshot(it, [it, it], [it, it], [float(it), 2.0 * it], [1.0 * it, it / 2], groups)
             for it in (100, 200, 300, 328)]

    def pos_grad(window):
        return window["heads"]["h"]["pos_grad"]

    assert pos_grad(since(snaps, 200)) == [128.0, 256.0]     # 200 -> 328
    assert pos_grad(since(snaps, 299)) == [128.0, 256.0]     # 200 is the last at or before
    assert pos_grad(since(snaps, 300)) == [28.0, 56.0]
    assert since(snaps, 50) is snaps[-1]                      # none before: the whole run
    assert pos_grad(since(snaps)) == [28.0, 56.0]             # the last snapshot interval
    assert since(snaps[:1]) is snaps[0]
    with pytest.raises(ValueError, match="no snapshots"):
        since([])
