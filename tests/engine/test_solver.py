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
