"""Weights trained by the papers' authors, as state dicts of eql_d2's detectors.

Two sources are understood:

``mmdet``
    mmdetection 2.x Mask R-CNN R50-FPN, the code base of the EQLv2 authors
    (tztztztztz/eqlv2: ``configs/end2end/{mask_rcnn,eql,eqlv2}_r50_8x2_1x.py``; softmax, EQL,
    EQLv2 and sigmoid classifiers), into ``GeneralizedRCNN`` + ``EQLROIHeads``
    (``configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_*.yaml``).
``up``
    United-Perception's ATSS with the IoU branch (``RetinaHeadWithIOU``, the EFL improved
    baseline ``configs/det/efl/efl_improved_baseline_r{50,101}_2x_rfs.yaml``), into eql_d2's
    ``ATSS`` with ``build_resnet_fpn_lateral_p6p7_backbone``
    (``configs/LVIS-v1/atss_R{50,101}_FPN_2x_rfs_*.yaml``).

Both use torchvision-layout ResNets ("pytorch" style: the stride of a bottleneck is in its
3x3 conv, so ``MODEL.RESNETS.STRIDE_IN_1X1`` is False) trained on RGB images normalised with
the ImageNet mean (123.675, 116.28, 103.53) and standard deviation (58.395, 57.12, 57.375).
:func:`input_settings` gives the config keys that match; with ``input_format="BGR"`` the
first convolution's input channels are reversed instead of the images.

What changes besides the names:

- UP's classifier lays its channels out class-major (channel = class x A + anchor, its
  post-processing's ``class_first`` permute); detectron2's heads read them anchor-major
  (channel = anchor x C + class). Rows are reordered. Its box (A x 4, anchor-major with one
  box per anchor) and IoU (A) channels already agree.
- UP's head towers' convolutions have no bias (GroupNorm follows); detectron2's have one:
  it is written as zeros, which computes the same.
- mmdetection's box classifier has C + 1 rows with the background / objectness row last,
  as eql_d2's heads (softmax: background; EQLv2: objectness; sigmoid and EQL: a row the
  scores do not read). Class-specific box deltas are [4 x C] class by class in both.
- BatchNorm's ``num_batches_tracked`` is dropped (FrozenBN has none). mmdetection's EQLv2
  gradient statistics (``pos_grad``, ``neg_grad``: sums over the training run of the
  weighted gradient magnitudes per category, as eql_d2's) are carried over; ``pos_neg`` is
  their ratio and is recomputed. UP's EFL statistics are not: its gradient hook reads the
  class-major classifier output as anchor-major (docs/PARITY.md), so its entry for a
  category sums gradients of other categories. Loss state the source cannot provide is
  written as the freshly built model holds it (statistics start from zero; EQL's category
  frequencies stay "unknown" and come from the training data if the model trains).

The mapping is name-based and complete: a source key no rule covers, a model key nothing
fills, or a shape that differs raises :class:`ConversionError` naming them.
"""

import collections
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

__all__ = ["ConversionError", "Conversion", "FORMATS", "convert_state_dict", "detect_format",
           "source_state_dict", "input_settings", "box_coding_notes", "TORCHVISION_PIXEL_MEAN",
           "TORCHVISION_PIXEL_STD"]

# ImageNet statistics of torchvision's ResNets, RGB, on the 0-255 scale
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)

FORMATS = ("mmdet", "up")

# Model keys that belong to a loss's running state (see eql_d2.engine.checkpoint)
_STATE_MODULES = ("cls_loss", "regime")

# How many keys an error lists of each kind
_SHOWN = 12


class ConversionError(ValueError):
    """A source state dict that does not map completely onto the target model."""


@dataclass
class Conversion:
    """The converted state dict and what happened to each key."""

    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    source_format: str
    mapped: Dict[str, str] = field(default_factory=dict)       # source key -> model key
    dropped: Dict[str, str] = field(default_factory=dict)      # source key -> why
    from_model: Dict[str, str] = field(default_factory=dict)   # model key -> why
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.mapped)} source tensors mapped to {len(self.state_dict)} model "
                 f"entries ({self.source_format})"]
        for title, items in (("dropped from the source", self.dropped),
                             ("filled without a source tensor", self.from_model)):
            if items:
                by_reason = collections.defaultdict(list)
                for k, why in items.items():
                    by_reason[why].append(k)
                for why, keys in by_reason.items():
                    lines.append(f"{title}: {len(keys)} ({why}), e.g. {keys[0]}")
        lines += self.notes
        return "\n".join(lines)


def _listed(keys):
    keys = list(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


# ------------------------------------------------------------------------- reading sources


def source_state_dict(checkpoint) -> "collections.OrderedDict[str, torch.Tensor]":
    """The model weights of a loaded checkpoint: mmdetection's ``state_dict``, UP's ``model``
    (its EMA weights are not used), or a bare state dict; DDP's ``module.`` prefix removed."""
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"a checkpoint is a dict, got {type(checkpoint).__name__}")
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    out = collections.OrderedDict()
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"entry {k!r} of the weights is a {type(v).__name__}, not a "
                                  "tensor: not a model state dict")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def detect_format(state_dict) -> str:
    """``mmdet`` or ``up`` from the key names."""
    keys = list(state_dict)
    if any(k.startswith(("rpn_head.", "roi_head.bbox_head.", "neck.lateral_convs.")) for k in keys):
        return "mmdet"
    if any(k.startswith(("roi_head.cls_subnet", "neck.c3_lateral", "backbone.layer0."))
           for k in keys):
        return "up"
    raise ConversionError(
        "cannot tell the checkpoint's code base from its keys (expected mmdetection's "
        "rpn_head. / roi_head.bbox_head. or United-Perception's roi_head.cls_subnet / "
        f"neck.c3_lateral); first keys: {_listed(keys[:5])}. Pass the format explicitly")


# --------------------------------------------------------------------------------- rules
#
# A rule is (source pattern, model key template, kind). The pattern is a full-match regular
# expression; the template takes the match's groups as positional `str.format` arguments,
# and s0 / l0 / i1 as the first group shifted to detectron2's numbering (_target_key).
# kind: "copy"; "state" (loss state, dropped when the model's loss keeps none); "tower"
# (a conv trained without bias whose model counterpart has one); "class_major" (UP's
# classifier rows); "drop:<reason>".

_BN = r"(weight|bias|running_mean|running_var)"
_NBT = "BatchNorm step counter (FrozenBN has none)"


def _resnet_rules(stem_conv: str, stem_bn: str):
    bb = "backbone.bottom_up"
    return [
        (rf"backbone\.{stem_conv}\.weight", f"{bb}.stem.conv1.weight", "copy"),
        (rf"backbone\.{stem_bn}\.{_BN}", f"{bb}.stem.conv1.norm.{{0}}", "copy"),
        (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight", f"{bb}.res{{s0}}.{{1}}.conv{{2}}.weight", "copy"),
        (rf"backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_BN}", f"{bb}.res{{s0}}.{{1}}.conv{{2}}.norm.{{3}}", "copy"),
        (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight", f"{bb}.res{{s0}}.{{1}}.shortcut.weight", "copy"),
        (rf"backbone\.layer(\d)\.(\d+)\.downsample\.1\.{_BN}", f"{bb}.res{{s0}}.{{1}}.shortcut.norm.{{2}}", "copy"),
        (r"backbone\..*\.num_batches_tracked", None, f"drop:{_NBT}"),
    ]


_MMDET_RULES = _resnet_rules(r"conv1", r"bn1") + [
    # FPN: lateral_convs[i] / fpn_convs[i] read the backbone's out_indices[i] = i (C2..C5);
    # detectron2 names them by stage
    (r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", "backbone.fpn_lateral{l0}.{1}", "copy"),
    (r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", "backbone.fpn_output{l0}.{1}", "copy"),
    (r"rpn_head\.rpn_conv\.(weight|bias)", "proposal_generator.rpn_head.conv.{0}", "copy"),
    (r"rpn_head\.rpn_cls\.(weight|bias)", "proposal_generator.rpn_head.objectness_logits.{0}", "copy"),
    (r"rpn_head\.rpn_reg\.(weight|bias)", "proposal_generator.rpn_head.anchor_deltas.{0}", "copy"),
    (r"roi_head\.bbox_head\.shared_fcs\.(\d+)\.(weight|bias)", "roi_heads.box_head.fc{i1}.{1}", "copy"),
    (r"roi_head\.bbox_head\.fc_cls\.(weight|bias)", "roi_heads.box_predictor.cls_score.{0}", "copy"),
    (r"roi_head\.bbox_head\.fc_reg\.(weight|bias)", "roi_heads.box_predictor.bbox_pred.{0}", "copy"),
    (r"roi_head\.bbox_head\.loss_cls\.(pos_grad|neg_grad)", "roi_heads.box_predictor.cls_loss.{0}", "state"),
    (r"roi_head\.bbox_head\.loss_cls\.pos_neg", None, "drop:EQLv2's gradient ratio, recomputed from pos_grad / neg_grad"),
    (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)", "roi_heads.mask_head.mask_fcn{i1}.{1}", "copy"),
    (r"roi_head\.mask_head\.upsample\.(weight|bias)", "roi_heads.mask_head.deconv.{0}", "copy"),
    (r"roi_head\.mask_head\.conv_logits\.(weight|bias)", "roi_heads.mask_head.predictor.{0}", "copy"),
]

_UP_LOSS_STATE = ("drop:UP's EFL gradient statistics, collected from the class-major "
                  "classifier output read as anchor-major (not per-category sums)")

# UP's ResNet keeps the stem as layer0 = Sequential(conv1, bn1, relu, maxpool); its saver
# also accepts torchvision's conv1 / bn1 names, so both are read.
_UP_RULES = (_resnet_rules(r"layer0\.0", r"layer0\.1") + _resnet_rules(r"conv1", r"bn1")[:2] + [
    # FPN levels are named by stage (c3_lateral, p3_conv, ...), P6 / P7 from convs on the
    # lateral of C5 (downsample: conv)
    (r"neck\.c(\d)_lateral\.(weight|bias)", "backbone.fpn_lateral{0}.{1}", "copy"),
    (r"neck\.p([3-5])_conv\.(weight|bias)", "backbone.fpn_output{0}.{1}", "copy"),
    (r"neck\.p6_conv\.(weight|bias)", "backbone.top_block.p6.{0}", "copy"),
    (r"neck\.p7_conv\.(weight|bias)", "backbone.top_block.p7.{0}", "copy"),
    # towers: Sequential(conv, gn, relu) x num_conv, flattened: conv at 3k, GroupNorm at 3k+1
    (r"roi_head\.cls_subnet\.(\d+)\.weight", "head.cls_subnet.{0}.weight", "tower"),
    (r"roi_head\.cls_subnet\.(\d+)\.bias", "head.cls_subnet.{0}.bias", "copy"),
    (r"roi_head\.box_subnet\.(\d+)\.weight", "head.bbox_subnet.{0}.weight", "tower"),
    (r"roi_head\.box_subnet\.(\d+)\.bias", "head.bbox_subnet.{0}.bias", "copy"),
    (r"roi_head\.cls_subnet_pred\.(weight|bias)", "head.cls_score.{0}", "class_major"),
    (r"roi_head\.box_subnet_pred\.(weight|bias)", "head.bbox_pred.{0}", "copy"),
    (r"roi_head\.iou_pred\.(weight|bias)", "head.iou_pred.{0}", "copy"),
    (r"post_process\.(cls_loss|loss_cls)\.(pos_grad|neg_grad|pos_neg)", None, _UP_LOSS_STATE),
])

_RULES = {"mmdet": _MMDET_RULES, "up": _UP_RULES}


def _is_state_key(key):
    return any(part in _STATE_MODULES for part in key.split(".")[:-1])


def _target_key(template, groups):
    named = {}
    if "{s0}" in template:  # torchvision layerN is detectron2's res(N+1)
        named["s0"] = int(groups[0]) + 1
    if "{l0}" in template:  # mmdetection's FPN input i is ResNet output i: C2, C3, ...
        named["l0"] = int(groups[0]) + 2
    if "{i1}" in template:  # 0-based ModuleList -> detectron2's 1-based fc1 / mask_fcn1
        named["i1"] = int(groups[0]) + 1
    return template.format(*groups, **named)


def _class_major_to_anchor_major(t: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """Rows c x A + a -> a x C + c (weight [C*A, ...] or bias [C*A])."""
    rows = t.shape[0]
    if rows % num_anchors:
        raise ConversionError(f"classifier rows {rows} are not a multiple of the {num_anchors} "
                              "anchors per location")
    c = rows // num_anchors
    return t.reshape(c, num_anchors, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def convert_state_dict(source: Dict[str, torch.Tensor], model_state: Dict[str, torch.Tensor],
                       source_format: Optional[str] = None,
                       input_format: str = "RGB") -> Conversion:
    """Map `source` (an authors' state dict, see :func:`source_state_dict`) onto the keys and
    shapes of `model_state` (the target model's ``state_dict()``).

    `input_format` "RGB" keeps the first conv as trained (the model then reads RGB images);
    "BGR" reverses its input channels, for a model that reads BGR. Raises
    :class:`ConversionError` naming every source key without a rule, every model key left
    unfilled and every shape that differs.
    """
    fmt = source_format or detect_format(source)
    if fmt not in _RULES:
        raise ConversionError(f"unknown source format {fmt!r}; known: {', '.join(FORMATS)}")
    if input_format not in ("RGB", "BGR"):
        raise ConversionError(f"input_format must be RGB or BGR, got {input_format!r}")
    rules = [(re.compile(p), t, kind) for p, t, kind in _RULES[fmt]]
    result = Conversion(collections.OrderedDict(), fmt)
    unmapped, wrong_shape, unexpected = [], [], []
    num_anchors = None
    if fmt == "up" and "head.iou_pred.weight" in model_state:
        num_anchors = model_state["head.iou_pred.weight"].shape[0]

    for key, value in source.items():
        match = next(((m, t, kind) for rx, t, kind in rules for m in [rx.fullmatch(key)] if m), None)
        if match is None:
            unmapped.append(key)
            continue
        m, template, kind = match
        if kind.startswith("drop:"):
            result.dropped[key] = kind[len("drop:"):]
            continue
        target = _target_key(template, m.groups())
        if target in result.state_dict:
            raise ConversionError(f"{key} and {result.mapped.get(target)} both map to {target}")
        if target not in model_state:
            if kind == "state":
                result.dropped[key] = "loss state the model's classification loss does not keep"
                continue
            unexpected.append(f"{key} -> {target}")
            continue
        value = value.detach().clone()
        if kind == "class_major":
            if num_anchors is None:
                raise ConversionError("the model has no head.iou_pred: not an ATSS head")
            value = _class_major_to_anchor_major(value, num_anchors)
        if target == "backbone.bottom_up.stem.conv1.weight" and input_format == "BGR":
            value = value.flip(1)
        expected = tuple(model_state[target].shape)
        if tuple(value.shape) != expected:
            wrong_shape.append(f"{key} {list(value.shape)} -> {target} {list(expected)}")
            continue
        result.state_dict[target] = value.to(model_state[target].dtype)
        result.mapped[key] = target
        if kind == "tower" and value.dim() == 4:
            # a tower conv without bias (GroupNorm follows); the model's conv has one
            bias_key = target[: -len("weight")] + "bias"
            if bias_key in model_state and key[: -len("weight")] + "bias" not in source:
                result.state_dict[bias_key] = torch.zeros_like(model_state[bias_key])
                result.from_model[bias_key] = "zero bias of a conv trained without one"

    missing = []
    for key, value in model_state.items():
        if key in result.state_dict:
            continue
        if _is_state_key(key):
            result.state_dict[key] = value.detach().clone()
            result.from_model[key] = "loss state the source does not provide, as newly built"
        elif key.endswith("num_batches_tracked"):
            result.state_dict[key] = value.detach().clone()
            result.from_model[key] = _NBT
        else:
            missing.append(key)

    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} source keys no {fmt} rule maps: {_listed(unmapped)}")
    if unexpected:
        problems.append(f"{len(unexpected)} source keys whose model key the model lacks: "
                        f"{_listed(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} of another shape (source -> model): "
                        f"{_listed(wrong_shape)}")
    if missing:
        problems.append(f"{len(missing)} model keys nothing in the source fills: {_listed(missing)}")
    if problems:
        raise ConversionError(
            f"the {fmt} checkpoint does not fit the model (another architecture, depth, number "
            "of classes or anchors?): " + "; ".join(problems))
    if fmt == "up":
        result.notes.append(f"classifier rows reordered from class-major to anchor-major "
                            f"({num_anchors} anchors per location)")
    if input_format == "BGR":
        result.notes.append("first conv's input channels reversed: the model reads BGR images")
    # the model's key order, as its own state_dict() would give it
    result.state_dict = collections.OrderedDict(
        (k, result.state_dict[k]) for k in model_state)
    return result


# ------------------------------------------------------------------------- config keys


def input_settings(input_format: str = "RGB") -> Dict[str, object]:
    """Config keys (dotted name -> value) a converted model needs besides its config: the
    torchvision ResNet layout and the pixel statistics it was trained with, in the channel
    order of `input_format`."""
    mean, std = list(TORCHVISION_PIXEL_MEAN), list(TORCHVISION_PIXEL_STD)
    if input_format == "BGR":
        mean, std = mean[::-1], std[::-1]
    elif input_format != "RGB":
        raise ConversionError(f"input_format must be RGB or BGR, got {input_format!r}")
    return {"MODEL.RESNETS.STRIDE_IN_1X1": False,
            "MODEL.PIXEL_MEAN": mean,
            "MODEL.PIXEL_STD": std,
            "INPUT.FORMAT": input_format}


def box_coding_notes(cfg, source_format: str) -> List[str]:
    """Warnings where the config decodes boxes otherwise than the source was trained to."""
    notes = []
    if source_format == "mmdet":
        # mmdetection's target_stds: RPN (1, 1, 1, 1), R-CNN (0.1, 0.1, 0.2, 0.2) -> weights 1/std
        for name, got, want in (("MODEL.RPN.BBOX_REG_WEIGHTS", cfg.MODEL.RPN.BBOX_REG_WEIGHTS, (1.0,) * 4),
                                ("MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS",
                                 cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS, (10.0, 10.0, 5.0, 5.0))):
            if tuple(float(x) for x in got) != want:
                notes.append(f"warning: {name} is {tuple(got)}, the source was trained with {want}")
        if cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            notes.append("warning: MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG is True; the source "
                         "regresses class-specific boxes")
    elif source_format == "up":
        got = tuple(float(x) for x in cfg.MODEL.ATSS.BBOX_REG_WEIGHTS)
        if got != (1.0,) * 4:
            notes.append(f"warning: MODEL.ATSS.BBOX_REG_WEIGHTS is {got}, the source was trained "
                         "with unscaled deltas (1, 1, 1, 1)")
    return notes
