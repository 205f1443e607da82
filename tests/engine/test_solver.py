"""SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model": the norm of all gradients together is
clipped, unlike detectron2's per-tensor "norm"."""

import pytest
import torch
from torch import nn

from eql_d2.config import get_eql_cfg
from eql_d2.solver import build_optimizer


def _cfg(clip_type, max_norm=1.0, enabled=True):
    cfg = get_eql_cfg()
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.BIAS_LR_FACTOR = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = enabled
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = max_norm
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    return cfg


def _model():
    model = nn.Linear(2, 2)  # weight [2, 2], bias [2]
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def _step(clip_type, max_norm=1.0, enabled=True):
    """One SGD step (lr 1) with gradients weight = [[3, 0], [0, 0]], bias = [0, 4]: each
    tensor's norm is 3 and 4, together 5. Returns the update of (weight, bias)."""
    model = _model()
    opt = build_optimizer(_cfg(clip_type, max_norm, enabled), model)
    model.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    model.bias.grad = torch.tensor([0.0, 4.0])
    opt.step()
    return -model.weight.detach(), -model.bias.detach()


def test_full_model_clipping_scales_all_gradients_by_max_norm_over_total_norm():
    w, b = _step("full_model", max_norm=1.0)
    # total norm 5 -> every gradient times 1 / 5
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.0], [0.0, 0.0]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, torch.tensor([0.0, 0.8]), rtol=1e-5, atol=1e-6)
    total = torch.cat([w.flatten(), b]).norm()
    assert total == pytest.approx(1.0, rel=1e-5)


def test_per_tensor_norm_clipping_is_weaker_and_full_model_leaves_small_gradients_alone():
    w, b = _step("norm", max_norm=3.5)
    # detectron2's "norm": the weight (norm 3) is untouched, the bias (4) goes to 3.5; the
    # total norm stays above 3.5
    torch.testing.assert_close(w, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(b, torch.tensor([0.0, 3.5]), rtol=1e-5, atol=1e-6)
    assert torch.cat([w.flatten(), b]).norm() > 4.6
    w, b = _step("full_model", max_norm=3.5)
    assert torch.cat([w.flatten(), b]).norm() == pytest.approx(3.5, rel=1e-5)
    w, b = _step("full_model", max_norm=10.0)
    torch.testing.assert_close(b, torch.tensor([0.0, 4.0]))
    w, b = _step("full_model", max_norm=1.0, enabled=False)
    torch.testing.assert_close(b, torch.tensor([0.0, 4.0]))


def test_unknown_clip_type_and_bad_value_are_named():
    with pytest.raises(ValueError, match="CLIP_TYPE 'global'"):
        build_optimizer(_cfg("global"), _model())
    with pytest.raises(ValueError, match="CLIP_VALUE must be positive"):
        build_optimizer(_cfg("full_model", max_norm=0.0), _model())


# ---------------------------------------------------------------------- epoch schedules


def _epoch_cfg(epochs, steps=(), warmup_epochs=0.0, warmup_iters=1, batch=4):
    cfg = get_eql_cfg()
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.EPOCHS = epochs
    cfg.SOLVER.EPOCH_STEPS = steps
    cfg.SOLVER.WARMUP_EPOCHS = warmup_epochs
    cfg.SOLVER.WARMUP_ITERS = warmup_iters
    return cfg


def test_epoch_schedule_is_epochs_times_iterations_per_epoch():
    from eql_d2.solver import resolve_epoch_schedule

    # 14 images per epoch at batch 4: ceil(3.5) = 4 iterations per epoch
    cfg = resolve_epoch_schedule(_epoch_cfg(24, (16, 22), warmup_epochs=1.0), 14)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (96, (64, 88), 4)
    # the longer of WARMUP_ITERS and WARMUP_EPOCHS; fractional epochs round
    cfg = resolve_epoch_schedule(_epoch_cfg(2.5, (1.5,), warmup_epochs=1.0, warmup_iters=7), 14)
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (10, (6,), 7)
    # EPOCHS 0: detectron2's iterations, untouched
    plain = _epoch_cfg(0.0)
    assert resolve_epoch_schedule(plain, 14) is plain


def test_epoch_schedule_errors_name_the_keys():
    from eql_d2.solver import resolve_epoch_schedule

    with pytest.raises(ValueError, match=r"SOLVER.EPOCH_STEPS \(22, 16\) must increase"):
        resolve_epoch_schedule(_epoch_cfg(24, (22, 16)), 14)
    with pytest.raises(ValueError, match=r"SOLVER.EPOCH_STEPS \(30,\) must increase and lie"):
        resolve_epoch_schedule(_epoch_cfg(24, (30,)), 14)
    with pytest.raises(ValueError, match="SOLVER.EPOCHS is 0"):
        resolve_epoch_schedule(_epoch_cfg(0.0, (8,)), 14)


def test_trainer_schedule_follows_the_samplers_epoch(small_synthetic, tmp_path):
    """Built on a real training set, the trainer's max_iter and learning-rate milestones
    come from the epoch length of its sampler (ceil repeat factors)."""
    import os

    from eql_d2.engine import Trainer
    from helpers import ROOT, TINY_RCNN, register_small

    train, val = register_small(small_synthetic, "epochs")
    cfg = get_eql_cfg(os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_sigmoid.yaml"),
                      TINY_RCNN)
    cfg.merge_from_list([
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
        "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
        "DATALOADER.REPEAT_THRESHOLD", "0.3", "DATALOADER.REPEAT_ROUNDING", "ceil",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.EPOCHS", "3.0", "SOLVER.EPOCH_STEPS", "(2,)",
        "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    loader = trainer.train_loader
    expanded = int(torch.ceil(loader.repeat_factors).sum())
    assert expanded > loader.num_images  # the threshold repeats some images
    assert loader.images_per_epoch == expanded
    per_epoch = -(-expanded // 4)
    assert trainer.max_iter == 3 * per_epoch
    assert trainer.cfg.SOLVER.STEPS == (2 * per_epoch,)
    multiplier = trainer.scheduler._multiplier
    step = 2 * per_epoch
    assert multiplier((step - 1) / trainer.max_iter) == pytest.approx(1.0)
    assert multiplier(step / trainer.max_iter) == pytest.approx(0.1)


def test_epochs_of_another_sampler_give_class_aware_sampling_the_rfs_iterations(
        small_synthetic, tmp_path):
    """SOLVER.EPOCH_SAMPLER: a class-aware sampling run counts its epochs in repeat factor
    sampling's epoch (same threshold and rounding), so it trains the iterations of the
    repeat factor sampling run with the same SOLVER.EPOCHS; "TrainingSampler" counts
    the training images; an unknown name is refused naming the key."""
    import os

    from eql_d2.engine import Trainer
    from helpers import ROOT, TINY_RCNN, register_small

    train, val = register_small(small_synthetic, "epoch_sampler")

    def trainer(*opts):
        cfg = get_eql_cfg(
            os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_sigmoid.yaml"),
            TINY_RCNN)
        cfg.merge_from_list([
            "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
            "DATALOADER.REPEAT_THRESHOLD", "0.3", "DATALOADER.REPEAT_ROUNDING", "ceil",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.EPOCHS", "3.0", "SOLVER.EPOCH_STEPS", "(2,)",
            "OUTPUT_DIR", str(tmp_path), *opts])
        return Trainer(cfg)

    rfs = trainer("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler")
    expanded = int(torch.ceil(rfs.train_loader.repeat_factors).sum())
    num_images = rfs.train_loader.num_images
    assert expanded > num_images
    cas = trainer("DATALOADER.SAMPLER_TRAIN", "ClassAwareSampler",
                  "SOLVER.EPOCH_SAMPLER", "RepeatFactorTrainingSampler")
    assert cas.train_loader.sampler == "ClassAwareSampler"
    assert cas.train_loader.repeat_factors is None
    assert cas.max_iter == rfs.max_iter == 3 * -(-expanded // 4)
    assert cas.cfg.SOLVER.STEPS == rfs.cfg.SOLVER.STEPS == (2 * -(-expanded // 4),)
    # the class-aware sampler's own epoch is the training images
    own = trainer("DATALOADER.SAMPLER_TRAIN", "ClassAwareSampler")
    assert own.max_iter == 3 * -(-num_images // 4)
    images = trainer("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
                     "SOLVER.EPOCH_SAMPLER", "TrainingSampler")
    assert images.max_iter == own.max_iter
    with pytest.raises(ValueError, match="SOLVER.EPOCH_SAMPLER 'ClassAwareSampler' is not one"):
        trainer("SOLVER.EPOCH_SAMPLER", "ClassAwareSampler")
