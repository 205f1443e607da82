"""Backbones of the long-tailed image-classification benchmarks of EQL, sec. 6: the CIFAR
ResNet (ResNet-32 on CIFAR-100-LT) and ResNet-10 (ImageNet-LT, as OLTR trains it)."""

import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone
from torch import nn

__all__ = ["CifarResNet", "build_cifar_resnet_backbone", "build_resnet10_backbone"]


class _CifarBasicBlock(nn.Module):
    """Two 3x3 convolutions with the parameter-free shortcut of He et al. (2016), option A:
    where the width doubles, the input is subsampled by 2 and zero-padded in channels."""

    def __init__(self, in_channels, out_channels, stride, norm):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))
        self.stride = stride
        self.pad = out_channels - in_channels
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(Backbone):
    """The CIFAR ResNet of He et al. (CVPR 2016, sec. 4.2): a 3x3 convolution of 16
    channels, then three stages of n basic blocks of 16, 32 and 64 channels at strides 1,
    2, 4; depth 6n + 2 (ResNet-32: n = 5, 0.46M parameters with a 10-class classifier).

    Outputs ``stage1`` .. ``stage3`` (those in `out_features`).
    """

    def __init__(self, depth: int = 32, in_channels: int = 3, norm: str = "BN",
                 out_features=("stage3",)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"MODEL.CIFAR_RESNET.DEPTH = {depth}: a CIFAR ResNet has depth "
                             "6n + 2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.stem = Conv2d(in_channels, 16, 3, padding=1, bias=False, norm=get_norm(norm, 16))
        nn.init.kaiming_normal_(self.stem.weight, mode="fan_out", nonlinearity="relu")
        names = ("stage1", "stage2", "stage3")
        unknown = sorted(set(out_features) - set(names))
        if unknown or not out_features:
            raise ValueError(f"MODEL.CIFAR_RESNET.OUT_FEATURES {list(out_features)}: choose "
                             f"from {list(names)}")
        self._out_features = list(out_features)
        self._out_feature_channels, self._out_feature_strides = {}, {}
        self.stages = nn.ModuleList()
        width, stride = 16, 1
        for k, name in enumerate(names):
            out = 16 * 2 ** k
            blocks = [_CifarBasicBlock(width, out, 1 if k == 0 else 2, norm)]
            blocks += [_CifarBasicBlock(out, out, 1, norm) for _ in range(n - 1)]
            self.stages.append(nn.Sequential(*blocks))
            stride *= 1 if k == 0 else 2
            self._out_feature_channels[name] = out
            self._out_feature_strides[name] = stride
            width = out
        self._names = names

    def forward(self, x):
        x = F.relu(self.stem(x))
        outputs = {}
        for name, stage in zip(self._names, self.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


@BACKBONE_REGISTRY.register()
def build_cifar_resnet_backbone(cfg, input_shape: ShapeSpec):
    """:class:`CifarResNet` of ``MODEL.CIFAR_RESNET`` (DEPTH, NORM, OUT_FEATURES)."""
    node = cfg.MODEL.CIFAR_RESNET
    return CifarResNet(node.DEPTH, input_shape.channels, node.NORM, tuple(node.OUT_FEATURES))


@BACKBONE_REGISTRY.register()
def build_resnet10_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ResNet (``build_resnet_backbone``) with ``MODEL.RESNETS.DEPTH`` 10 too:
    one BasicBlock per stage, the ResNet-10 OLTR (Liu et al., CVPR 2019) and EQL (sec. 6)
    train on ImageNet-LT; 18 and 34 are built by detectron2."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH != 10:
        return build_resnet_backbone(cfg, input_shape)
    if r.RES2_OUT_CHANNELS != 64 or r.NUM_GROUPS != 1 or r.RES5_DILATION != 1:
        raise ValueError("ResNet-10 (MODEL.RESNETS.DEPTH 10) has basic blocks: set "
                         "MODEL.RESNETS.RES2_OUT_CHANNELS 64, NUM_GROUPS 1, RES5_DILATION 1")
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages, in_channels, out_channels = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx in range(4):
        stages.append(ResNet.make_stage(BasicBlock, 1, in_channels=in_channels,
                                        out_channels=out_channels, norm=r.NORM,
                                        stride_per_block=[1 if idx == 0 else 2]))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES,
                  freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
