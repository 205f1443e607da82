"""YOLOX's recipe on the trainer's side: the EMA of weights against its closed form, its
checkpoint state and its use for evaluation; YOLOXWarmCosineLR against YOLOX's formula;
the switch to the last epochs without Mosaic at its iteration, also after a resume."""

import math
from types import SimpleNamespace

import pytest
import torch

from eql_d2.config import get_eql_cfg
from eql_d2.engine.ema import ModelEMA, ModelEMAHook, NoAugmentationPhase, load_ema_for_evaluation
from eql_d2.solver.schedules import build_lr_scheduler


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_ema_follows_its_closed_form():
    """ema_u = d_u ema_{u-1} + (1 - d_u) w_u with d_u = DECAY (1 - exp(-u / RAMP)), in
    float64 by hand; BatchNorm's running statistics are averaged, its batch count copied."""
    model = _model()
    ema = ModelEMA(decay=0.9, ramp_updates=3.0)
    ema.reset(model)
    expected = {k: v.double().clone() for k, v in model.state_dict().items()
                if v.is_floating_point()}
    for u in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(5, 3))  # moves the running statistics and the batch count
        ema.update(model)
        d = 0.9 * (1 - math.exp(-u / 3.0))
        assert ema.decay_at(u) == pytest.approx(d)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v.double()
                assert torch.allclose(ema.weights[k].double(), expected[k], atol=1e-6), k
        assert torch.equal(ema.weights["1.num_batches_tracked"],
                           model.state_dict()["1.num_batches_tracked"])
    assert ema.updates == 5
    constant = ModelEMA(decay=0.5, ramp_updates=0.0)
    assert constant.decay_at(1) == 0.5


def _ema_then_trained(model):
    """An EMA reset on `model`, then the model's parameters moved as training would:
    (the EMA, the weights at the reset, the weights after)."""
    ema = ModelEMA()
    ema.reset(model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3).add_(1.0)
    return ema, own, {k: v.clone() for k, v in model.state_dict().items()}


def test_ema_weights_apply_for_a_block_and_the_state_round_trips(tmp_path):
    model = _model()
    ema, own, trained = _ema_then_trained(model)
    with ema.applied_to(model):
        assert all(torch.equal(model.state_dict()[k], own[k]) for k in own)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)

    path = tmp_path / "ckpt.pth"
    torch.save({"model_ema": ema.state_dict()}, path)
    restored = ModelEMA()
    restored.load_state_dict(torch.load(path, weights_only=False)["model_ema"])
    assert restored.updates == ema.updates
    assert all(torch.equal(restored.weights[k], ema.weights[k]) for k in ema.weights)

    cfg = get_eql_cfg(opts=["MODEL_EMA.ENABLED", "True"])
    assert load_ema_for_evaluation(cfg, model, {"model_ema": ema.state_dict()}, str(path))
    assert all(torch.equal(model.state_dict()[k], own[k]) for k in own)
    assert not load_ema_for_evaluation(cfg, model, {}, str(path))
    with pytest.raises(ValueError, match="do not fit"):
        load_ema_for_evaluation(cfg, torch.nn.Linear(3, 4), {"model_ema": ema.state_dict()},
                                str(path))


def test_prediction_weights_are_the_ema_ones_when_enabled(tmp_path):
    """demo.py and tools/ensemble.py load a file as --eval-only does: its EMA weights with
    MODEL_EMA.ENABLED, its model weights otherwise."""
    from eql_d2.engine.ema import load_prediction_weights

    ema, own, trained = _ema_then_trained(_model())
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": trained, "model_ema": ema.state_dict()}, path)
    for enabled, expected in (("True", own), ("False", trained)):
        fresh = _model()
        load_prediction_weights(get_eql_cfg(opts=["MODEL_EMA.ENABLED", enabled]), fresh, path)
        assert all(torch.equal(fresh.state_dict()[k], expected[k]) for k in expected), enabled


def test_a_resumed_ema_hook_keeps_the_restored_average():
    model = _model()
    ema = ModelEMA(decay=0.9, ramp_updates=0.0)
    ema.load_state_dict({"decay": 0.9, "ramp_updates": 0.0, "updates": 7,
                         "weights": {k: torch.zeros_like(v)
                                     for k, v in model.state_dict().items()}})
    hook = ModelEMAHook(ema)
    hook.trainer = SimpleNamespace(model=model)
    hook.before_train()
    hook.after_step()
    assert ema.updates == 8
    w = model.state_dict()["0.weight"]
    assert torch.allclose(ema.weights["0.weight"], 0.1 * w)
    bad = ModelEMAHook(ModelEMA())
    bad.ema.load_state_dict({"decay": 0.9998, "ramp_updates": 2000.0, "updates": 1,
                             "weights": {"other": torch.zeros(1)}})
    bad.trainer = SimpleNamespace(model=model)
    with pytest.raises(ValueError, match="--resume"):
        bad.before_train()


def _yolox_warm_cos(lr, min_lr_ratio, total_iters, warmup_total_iters, warmup_lr_start,
                    no_aug_iter, iters):
    """YOLOX's yolox_warm_cos_lr (yolox/utils/lr_scheduler.py), transcribed."""
    min_lr = lr * min_lr_ratio
    if iters <= warmup_total_iters:
        lr = (lr - warmup_lr_start) * pow(iters / float(warmup_total_iters), 2) + warmup_lr_start
    elif iters >= total_iters - no_aug_iter:
        lr = min_lr
    else:
        lr = min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(
            math.pi * (iters - warmup_total_iters) / (total_iters - warmup_total_iters
                                                      - no_aug_iter)))
    return lr


@pytest.mark.parametrize("warmup_factor", [0.0, 0.1])
def test_yolox_warm_cosine_schedule_is_yoloxs_formula(warmup_factor):
    cfg = get_eql_cfg(opts=["SOLVER.LR_SCHEDULER_NAME", "YOLOXWarmCosineLR",
                            "SOLVER.BASE_LR", "0.02", "SOLVER.BASE_LR_END", "0.001",
                            "SOLVER.MAX_ITER", "60", "SOLVER.WARMUP_ITERS", "10",
                            "SOLVER.WARMUP_FACTOR", str(warmup_factor)])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    scheduler = build_lr_scheduler(cfg, optimizer, constant_iters=15)
    rates = []
    for _ in range(60):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [_yolox_warm_cos(0.02, 0.05, 60, 10, 0.02 * warmup_factor, 15, k)
                for k in range(60)]
    assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert rates[0] == pytest.approx(0.02 * warmup_factor) and rates[10] == pytest.approx(0.02)
    assert rates[44] > 0.001 and rates[45:] == pytest.approx([0.001] * 15)


def test_the_schedule_refuses_a_warm_up_and_constant_end_longer_than_training():
    cfg = get_eql_cfg(opts=["SOLVER.LR_SCHEDULER_NAME", "YOLOXWarmCosineLR",
                            "SOLVER.MAX_ITER", "20", "SOLVER.WARMUP_ITERS", "10"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    with pytest.raises(ValueError, match="NO_AUG_EPOCHS"):
        build_lr_scheduler(cfg, optimizer, constant_iters=11)


class _L1Model(torch.nn.Module):
    def __init__(self, use_l1_loss=False):
        super().__init__()
        self.use_l1_loss = use_l1_loss


def _run_phase(start_iter, first, last, model):
    """The hook over iterations first..last-1, as a (resumed) run starting at `first` calls
    it; returns the model's use_l1_loss at each step and the mapper's switch."""
    mapper = SimpleNamespace(no_aug_from_iter=None)
    hook = NoAugmentationPhase(start_iter, mapper)
    trainer = SimpleNamespace(model=model, iter=first, max_iter=last)
    hook.trainer = trainer
    hook.before_train()
    seen = []
    for k in range(first, last):
        trainer.iter = k
        hook.before_step()
        seen.append(getattr(model, "module", model).use_l1_loss)
    return seen, mapper.no_aug_from_iter


def test_the_l1_loss_switches_on_at_its_iteration_also_after_a_resume():
    whole, switch = _run_phase(6, 0, 10, _L1Model())
    assert switch == 6 and whole == [False] * 6 + [True] * 4
    # resumed before and after the switch: the same flag at every iteration
    assert _run_phase(6, 4, 10, _L1Model())[0] == whole[4:]
    assert _run_phase(6, 8, 10, _L1Model())[0] == whole[8:]
    # a model configured with the L1 loss keeps it
    assert _run_phase(6, 0, 10, _L1Model(True))[0] == [True] * 10
    # DDP: the wrapped module's flag
    wrapped = SimpleNamespace(module=_L1Model())
    _run_phase(6, 0, 10, wrapped)
    assert wrapped.module.use_l1_loss
