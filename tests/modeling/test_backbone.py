"""build_resnet_fpn_lateral_p6p7_backbone: P6 from the FPN's lateral of C5, P7 from P6 with no
ReLU, checked against the convolutions applied by hand."""

import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from eql_d2.config import get_eql_cfg
from helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(name):
    cfg = get_eql_cfg(os.path.join(ROOT, "configs/Synthetic-LT/Base-OneStage-R18-FPN.yaml"))
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    return cfg


def test_p6_comes_from_the_c5_lateral_and_p7_from_p6_without_relu():
    torch.manual_seed(0)
    backbone = build_backbone(_cfg("build_resnet_fpn_lateral_p6p7_backbone"))
    backbone.eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = backbone(x)
        c5 = backbone.bottom_up(x)["res5"]
        lateral = backbone.lateral_convs[0](c5)
        top = backbone.top_block
        p6 = F.conv2d(lateral, top.p6.weight, top.p6.bias, stride=2, padding=1)
        p7 = F.conv2d(p6, top.p7.weight, top.p7.bias, stride=2, padding=1)
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert lateral.shape[1] == 32 and c5.shape[1] != 32  # the lateral, not C5 itself
    torch.testing.assert_close(out["p6"], p6)
    torch.testing.assert_close(out["p7"], p7)
    assert (p6 < 0).any()  # a ReLU before P7 would have changed the result
    with torch.no_grad():
        assert not torch.allclose(out["p7"], F.conv2d(F.relu(p6), top.p7.weight, top.p7.bias,
                                                      stride=2, padding=1))
    # the lateral conv is stored once (under the FPN), not again under the top block
    keys = list(backbone.state_dict())
    assert not any(k.startswith("top_block._lateral") for k in keys)
    assert backbone.output_shape()["p7"] == ShapeSpec(channels=32, stride=128)


def test_detectron2s_retinanet_backbone_differs():
    torch.manual_seed(0)
    ours = build_backbone(_cfg("build_resnet_fpn_lateral_p6p7_backbone"))
    torch.manual_seed(0)
    theirs = build_backbone(_cfg("build_retinanet_resnet_fpn_backbone"))
    # detectron2's P6 convolves C5 (512 channels for R18), ours the 32-channel lateral
    assert theirs.top_block.p6.weight.shape[1] == 512
    assert ours.top_block.p6.weight.shape[1] == 32


def test_in_features_must_end_with_res5():
    cfg = _cfg("build_resnet_fpn_lateral_p6p7_backbone")
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4"]
    with pytest.raises(ValueError, match="MODEL.FPN.IN_FEATURES must end with res5"):
        build_backbone(cfg)
