"""ResNet-FPN with P6 / P7 made as in the EFL authors' improved baseline.

detectron2's RetinaNet backbone (``build_retinanet_resnet_fpn_backbone``) computes P6 with a
3x3 stride-2 conv on C5 itself (2048 channels) and P7 from ReLU(P6). United-Perception's
FPN, which the EFL paper's numbers come from, computes P6 from the 1x1 lateral conv of C5
(256 channels, before the top-down sum and the 3x3 output conv) and P7 from P6 with no ReLU
in between.
"""

import fvcore.nn.weight_init as weight_init
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from torch import nn

__all__ = ["LateralP6P7", "build_resnet_fpn_lateral_p6p7_backbone"]


class LateralP6P7(nn.Module):
    """FPN top block: P6 = conv3x3/2(lateral(C5)), P7 = conv3x3/2(P6), no ReLU between.

    ``lateral`` is the FPN's own 1x1 conv of C5 (set with :meth:`attach`); it is referenced,
    not registered here, so its weights appear once in the state dict."""

    in_feature = "res5"
    num_levels = 2

    def __init__(self, channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            weight_init.c2_xavier_fill(module)
        self._lateral = ()

    def attach(self, lateral: nn.Module) -> "LateralP6P7":
        self._lateral = (lateral,)
        return self

    def forward(self, c5):
        if not self._lateral:
            raise RuntimeError("LateralP6P7 needs the FPN's lateral conv of C5 (attach)")
        p6 = self.p6(self._lateral[0](c5))
        return [p6, self.p7(p6)]


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_lateral_p6p7_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ResNet-FPN (``MODEL.RESNETS``, ``MODEL.FPN``) with :class:`LateralP6P7`:
    P3-P7 for one-stage detectors with the EFL authors' P6 / P7."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    if in_features[-1] != "res5":
        raise ValueError("build_resnet_fpn_lateral_p6p7_backbone makes P6 from the lateral of "
                         f"res5: MODEL.FPN.IN_FEATURES must end with res5, got {in_features}")
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block = LateralP6P7(out_channels)
    backbone = FPN(bottom_up=bottom_up, in_features=in_features, out_channels=out_channels,
                   norm=cfg.MODEL.FPN.NORM, top_block=top_block,
                   fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
    # FPN keeps its lateral convs from the coarsest level down: [0] is res5's
    top_block.attach(backbone.lateral_convs[0])
    return backbone
