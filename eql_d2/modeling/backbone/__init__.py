"""Backbones registered in detectron2's BACKBONE_REGISTRY."""

from .fpn import LateralP6P7, build_resnet_fpn_lateral_p6p7_backbone  # noqa: F401
from .classification import (CifarResNet, build_cifar_resnet_backbone,  # noqa: F401
                             build_resnet10_backbone)
from .cspdarknet import YOLOPAFPN, build_yolox_cspdarknet_pafpn_backbone  # noqa: F401
