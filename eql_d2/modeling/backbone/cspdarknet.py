"""CSPDarknet with a PAFPN neck: the backbone of YOLOX (Ge et al., "YOLOX: Exceeding YOLO
Series in 2021", arXiv 2107.08430), as its release (Megvii-BaseDetection/YOLOX,
``yolox/models/darknet.py``, ``yolo_pafpn.py``) builds it.

- Stem: YOLOX's Focus (the four pixel phases of each 2 x 2 block stacked as channels, then a
  3x3 conv), not the 6x6 stride-2 conv of YOLOv5 v6.
- Stages dark2-dark5: a 3x3 stride-2 conv then a CSP layer (two 1x1 branches of half the
  width, one through n bottlenecks, concatenated and fused by a 1x1 conv); dark5 has the SPP
  bottleneck (max-pools 5, 9, 13) before its CSP layer, whose bottlenecks have no shortcut.
- Every conv is conv (no bias) -> norm -> SiLU; BatchNorm with eps 1e-3 and momentum 0.03.
- Widths: 64 x w for the stem, doubling per stage; depths: n = max(round(3 d), 1) bottlenecks
  in dark2 and dark5, 3n in dark3 and dark4 (YOLOX-S: d = 0.33, w = 0.50; M: 0.67, 0.75).
- PAFPN: top-down (1x1 reduce, nearest x2 upsampling, concatenation, CSP layer without
  shortcut) then bottom-up (3x3 stride-2 conv, concatenation, CSP layer), giving ``p3``,
  ``p4``, ``p5`` at strides 8, 16, 32 with 256 w, 512 w and 1024 w channels.
"""

import torch
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

__all__ = ["ConvNormAct", "CSPLayer", "CSPDarknet", "YOLOPAFPN",
           "build_yolox_cspdarknet_pafpn_backbone"]

# YOLOX's BatchNorm settings (init_yolo in yolox/exp/yolox_base.py)
BN_EPS, BN_MOMENTUM = 1e-3, 0.03


class ConvNormAct(nn.Sequential):
    """conv (k x k, 'same' padding, no bias) -> norm -> SiLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, norm="BN"):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              padding=(kernel_size - 1) // 2, bias=False)
        self.norm = get_norm(norm, out_channels) or nn.Identity()
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            self.norm.eps, self.norm.momentum = BN_EPS, BN_MOMENTUM
        self.act = nn.SiLU(inplace=True)


class Bottleneck(nn.Module):
    """1x1 conv to the same width, 3x3 conv, plus the input when ``shortcut``."""

    def __init__(self, channels, shortcut, norm):
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, 1, norm=norm)
        self.conv2 = ConvNormAct(channels, channels, 3, norm=norm)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class CSPLayer(nn.Module):
    """Cross-stage partial layer (YOLOv5's C3): two 1x1 branches of out/2 channels, the first
    through ``n`` bottlenecks, concatenated and fused by a 1x1 conv to ``out_channels``."""

    def __init__(self, in_channels, out_channels, n, shortcut=True, norm="BN"):
        super().__init__()
        hidden = out_channels // 2
        self.conv1 = ConvNormAct(in_channels, hidden, 1, norm=norm)
        self.conv2 = ConvNormAct(in_channels, hidden, 1, norm=norm)
        self.conv3 = ConvNormAct(2 * hidden, out_channels, 1, norm=norm)
        self.blocks = nn.Sequential(*[Bottleneck(hidden, shortcut, norm) for _ in range(n)])

    def forward(self, x):
        return self.conv3(torch.cat([self.blocks(self.conv1(x)), self.conv2(x)], dim=1))


class SPPBottleneck(nn.Module):
    """1x1 conv to half the width, concatenated with its max-pools of each kernel size
    (stride 1, 'same' padding), fused by a 1x1 conv."""

    def __init__(self, in_channels, out_channels, kernel_sizes=(5, 9, 13), norm="BN"):
        super().__init__()
        hidden = in_channels // 2
        self.conv1 = ConvNormAct(in_channels, hidden, 1, norm=norm)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernel_sizes)
        self.conv2 = ConvNormAct(hidden * (len(kernel_sizes) + 1), out_channels, 1, norm=norm)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.pools], dim=1))


class Focus(nn.Module):
    """Space-to-depth: each 2 x 2 block's four pixels become channels (order: top-left,
    bottom-left, top-right, bottom-right, as YOLOX), then a 3x3 conv. Halves the resolution."""

    def __init__(self, in_channels, out_channels, norm="BN"):
        super().__init__()
        self.conv = ConvNormAct(4 * in_channels, out_channels, 3, norm=norm)

    def forward(self, x):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"Focus needs even image sides, got {tuple(x.shape[-2:])}")
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2],
                                    x[..., 1::2, 1::2]], dim=1))


def stage_depth(depth_multiplier: float) -> int:
    """n, YOLOX's base depth: max(round(3 d), 1)."""
    return max(round(3 * depth_multiplier), 1)


class CSPDarknet(nn.Module):
    """YOLOX's CSPDarknet (see the module docstring); returns ``dark3``, ``dark4``, ``dark5``
    (strides 8, 16, 32; 256 w, 512 w, 1024 w channels)."""

    def __init__(self, depth_multiplier: float, width_multiplier: float, in_channels=3,
                 norm="BN"):
        super().__init__()
        base = int(64 * width_multiplier)
        n = stage_depth(depth_multiplier)
        if base < 2:
            raise ValueError(f"MODEL.CSPDARKNET.WIDTH_MULTIPLIER {width_multiplier} leaves "
                             f"{base} stem channels; use at least 2 / 64")
        self.stem = Focus(in_channels, base, norm)
        self.dark2 = nn.Sequential(ConvNormAct(base, 2 * base, 3, 2, norm),
                                   CSPLayer(2 * base, 2 * base, n, norm=norm))
        self.dark3 = nn.Sequential(ConvNormAct(2 * base, 4 * base, 3, 2, norm),
                                   CSPLayer(4 * base, 4 * base, 3 * n, norm=norm))
        self.dark4 = nn.Sequential(ConvNormAct(4 * base, 8 * base, 3, 2, norm),
                                   CSPLayer(8 * base, 8 * base, 3 * n, norm=norm))
        self.dark5 = nn.Sequential(ConvNormAct(8 * base, 16 * base, 3, 2, norm),
                                   SPPBottleneck(16 * base, 16 * base, norm=norm),
                                   CSPLayer(16 * base, 16 * base, n, shortcut=False, norm=norm))
        self.channels = (4 * base, 8 * base, 16 * base)

    def forward(self, x):
        x = self.dark2(self.stem(x))
        c3 = self.dark3(x)
        c4 = self.dark4(c3)
        return c3, c4, self.dark5(c4)


class YOLOPAFPN(Backbone):
    """CSPDarknet + YOLOX's PAFPN as a detectron2 :class:`Backbone` with outputs ``p3``,
    ``p4``, ``p5`` (strides 8, 16, 32). Input sides must be multiples of 32
    (``size_divisibility``)."""

    def __init__(self, depth_multiplier: float, width_multiplier: float, in_channels=3,
                 norm="BN"):
        super().__init__()
        self.darknet = CSPDarknet(depth_multiplier, width_multiplier, in_channels, norm)
        c3, c4, c5 = self.darknet.channels
        n = round(3 * depth_multiplier)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_conv5 = ConvNormAct(c5, c4, 1, norm=norm)
        self.top_down4 = CSPLayer(2 * c4, c4, n, shortcut=False, norm=norm)
        self.lateral_conv4 = ConvNormAct(c4, c3, 1, norm=norm)
        self.top_down3 = CSPLayer(2 * c3, c3, n, shortcut=False, norm=norm)
        self.down_conv3 = ConvNormAct(c3, c3, 3, 2, norm=norm)
        self.bottom_up4 = CSPLayer(2 * c3, c4, n, shortcut=False, norm=norm)
        self.down_conv4 = ConvNormAct(c4, c4, 3, 2, norm=norm)
        self.bottom_up5 = CSPLayer(2 * c4, c5, n, shortcut=False, norm=norm)
        self._out_features = ["p3", "p4", "p5"]
        self._out_feature_channels = dict(zip(self._out_features, (c3, c4, c5)))
        self._out_feature_strides = dict(zip(self._out_features, (8, 16, 32)))

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x):
        c3, c4, c5 = self.darknet(x)
        lat5 = self.lateral_conv5(c5)
        td4 = self.top_down4(torch.cat([self.upsample(lat5), c4], dim=1))
        lat4 = self.lateral_conv4(td4)
        p3 = self.top_down3(torch.cat([self.upsample(lat4), c3], dim=1))
        p4 = self.bottom_up4(torch.cat([self.down_conv3(p3), lat4], dim=1))
        p5 = self.bottom_up5(torch.cat([self.down_conv4(p4), lat5], dim=1))
        return {"p3": p3, "p4": p4, "p5": p5}

    def output_shape(self):
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}


@BACKBONE_REGISTRY.register()
def build_yolox_cspdarknet_pafpn_backbone(cfg, input_shape: ShapeSpec):
    """:class:`YOLOPAFPN` of ``MODEL.CSPDARKNET`` (DEPTH_MULTIPLIER, WIDTH_MULTIPLIER, NORM)."""
    node = cfg.MODEL.CSPDARKNET
    for key in ("DEPTH_MULTIPLIER", "WIDTH_MULTIPLIER"):
        if not node[key] > 0:
            raise ValueError(f"MODEL.CSPDARKNET.{key} must be > 0, got {node[key]}")
    return YOLOPAFPN(node.DEPTH_MULTIPLIER, node.WIDTH_MULTIPLIER, input_shape.channels,
                     node.NORM)

