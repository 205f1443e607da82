"""tools/convert_checkpoint.py and eql_d2.checkpoint: the authors' checkpoints as eql_d2 weights.

The source state dicts are built here with the authors' key names and shapes: the backbone
from torchvision's ResNet (mmdetection's ResNet and United-Perception's share its names,
UP with the stem as ``layer0``), the rest from the authors' module definitions
(tztztztztz/eqlv2 at 907fad9: mmdet 2.3 ``FPN``, ``RPNHead``, ``Shared2FCBBoxHead``,
``FCNMaskHead``, the ``EQLv2`` loss buffers; ModelTC/United-Perception at 52aaeb9: neck
``FPN`` with ``downsample: conv``, ``RetinaHeadWithIOU`` with GroupNorm towers, the
``equalized_focal_loss`` buffers), with small head widths and class counts. Converted, they
must fill the eql_d2 model of the matching config exactly, and compute what the authors'
layers compute.
"""

import collections
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from helpers import ROOT, load_script

from eql_d2.checkpoint import (ConversionError, convert_state_dict, detect_format,
                               input_settings, source_state_dict)

pytestmark = pytest.mark.usefixtures("one_thread")

EQLV2_CONFIG = os.path.join(ROOT, "configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_eqlv2.yaml")
SOFTMAX_CONFIG = os.path.join(ROOT, "configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_softmax.yaml")
ATSS_CONFIG = os.path.join(ROOT, "configs/LVIS-v1/atss_R50_FPN_2x_rfs_efl.yaml")

C = 5           # categories
FPN = 32        # FPN / head channels (GroupNorm(32) needs a multiple of 32)
FC = 64         # box head FC width
MASK = 32       # mask head conv width
A = 2           # ATSS anchors per location (scales 6 and 8)
RCNN_OPTS = ["MODEL.ROI_HEADS.NUM_CLASSES", str(C), "MODEL.FPN.OUT_CHANNELS", str(FPN),
             "MODEL.ROI_BOX_HEAD.FC_DIM", str(FC), "MODEL.ROI_MASK_HEAD.CONV_DIM", str(MASK)]
ATSS_OPTS = ["MODEL.ATSS.NUM_CLASSES", str(C), "MODEL.FPN.OUT_CHANNELS", str(FPN)]


class MetaObject:
    """An object other than tensors and containers, as a checkpoint's meta may hold."""


def _load_tool():
    return load_script("tools/convert_checkpoint.py")


tool = _load_tool()


# --------------------------------------------------------------- the authors' state dicts


def torchvision_resnet50(seed=0):
    """torchvision's ResNet-50 in eval mode with random weights and BatchNorm statistics
    (as a trained network has), fc removed."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(1000)
    net.fc = torch.nn.Identity()
    return net.eval()


def _t(*shape, std=0.05):
    return torch.randn(*shape) * std


def mmdet_mask_rcnn_state(loss="EQLv2", seed=0):
    """mmdetection 2.3 Mask R-CNN R50-FPN (configs/_base_/models/mask_rcnn_r50_fpn.py) with
    C categories: keys and shapes of its modules' state dicts."""
    sd = collections.OrderedDict(
        (f"backbone.{k}", v.clone()) for k, v in torchvision_resnet50(seed).state_dict().items())
    torch.manual_seed(seed + 1)
    for i, cin in enumerate([256, 512, 1024, 2048]):      # FPN: ConvModule(...).conv
        sd[f"neck.lateral_convs.{i}.conv.weight"] = _t(FPN, cin, 1, 1)
        sd[f"neck.lateral_convs.{i}.conv.bias"] = _t(FPN)
        sd[f"neck.fpn_convs.{i}.conv.weight"] = _t(FPN, FPN, 3, 3)
        sd[f"neck.fpn_convs.{i}.conv.bias"] = _t(FPN)
    sd["rpn_head.rpn_conv.weight"], sd["rpn_head.rpn_conv.bias"] = _t(FPN, FPN, 3, 3), _t(FPN)
    sd["rpn_head.rpn_cls.weight"], sd["rpn_head.rpn_cls.bias"] = _t(3, FPN, 1, 1), _t(3)
    sd["rpn_head.rpn_reg.weight"], sd["rpn_head.rpn_reg.bias"] = _t(12, FPN, 1, 1), _t(12)
    bh = "roi_head.bbox_head"
    sd[f"{bh}.fc_cls.weight"], sd[f"{bh}.fc_cls.bias"] = _t(C + 1, FC), _t(C + 1, std=1.0)
    sd[f"{bh}.fc_reg.weight"], sd[f"{bh}.fc_reg.bias"] = _t(4 * C, FC), _t(4 * C)
    sd[f"{bh}.shared_fcs.0.weight"], sd[f"{bh}.shared_fcs.0.bias"] = _t(FC, FPN * 49), _t(FC)
    sd[f"{bh}.shared_fcs.1.weight"], sd[f"{bh}.shared_fcs.1.bias"] = _t(FC, FC), _t(FC)
    if loss == "EQLv2":
        sd[f"{bh}.loss_cls.pos_grad"] = torch.rand(C) * 10
        sd[f"{bh}.loss_cls.neg_grad"] = torch.rand(C) * 100
        sd[f"{bh}.loss_cls.pos_neg"] = sd[f"{bh}.loss_cls.pos_grad"] / sd[f"{bh}.loss_cls.neg_grad"]
    mh = "roi_head.mask_head"
    for i in range(4):
        sd[f"{mh}.convs.{i}.conv.weight"] = _t(MASK, FPN if i == 0 else MASK, 3, 3)
        sd[f"{mh}.convs.{i}.conv.bias"] = _t(MASK)
    sd[f"{mh}.upsample.weight"], sd[f"{mh}.upsample.bias"] = _t(MASK, MASK, 2, 2), _t(MASK)
    sd[f"{mh}.conv_logits.weight"], sd[f"{mh}.conv_logits.bias"] = _t(C, MASK, 1, 1), _t(C)
    return sd


def up_atss_state(seed=0, stem_names="layer0"):
    """United-Perception's ATSS-EFL improved baseline (efl_improved_baseline_r50_2x_rfs.yaml:
    resnet50 with freeze_bn, FPN start_level 3 / num_level 5 / downsample conv,
    RetinaHeadWithIOU with GN towers, num_anchors 2, sigmoid) with C categories."""
    sd = collections.OrderedDict()
    for k, v in torchvision_resnet50(seed).state_dict().items():
        if stem_names == "layer0":  # UP's own stem names (saver_helper's conversion)
            k = k.replace("conv1.", "layer0.0.", 1) if k.startswith("conv1.") else k
            k = k.replace("bn1.", "layer0.1.", 1) if k.startswith("bn1.") else k
        sd[f"backbone.{k}"] = v.clone()
    torch.manual_seed(seed + 1)
    for lvl, cin in zip((3, 4, 5), (512, 1024, 2048)):
        sd[f"neck.c{lvl}_lateral.weight"], sd[f"neck.c{lvl}_lateral.bias"] = _t(FPN, cin, 1, 1), _t(FPN)
        sd[f"neck.p{lvl}_conv.weight"], sd[f"neck.p{lvl}_conv.bias"] = _t(FPN, FPN, 3, 3), _t(FPN)
    for lvl in (6, 7):
        sd[f"neck.p{lvl}_conv.weight"], sd[f"neck.p{lvl}_conv.bias"] = _t(FPN, FPN, 3, 3), _t(FPN)
    for tower in ("cls_subnet", "box_subnet"):
        for j in range(4):  # build_conv_norm children: conv (no bias), gn, relu
            sd[f"roi_head.{tower}.{3 * j}.weight"] = _t(FPN, FPN, 3, 3, std=0.1)
            sd[f"roi_head.{tower}.{3 * j + 1}.weight"] = 1 + _t(FPN, std=0.2)
            sd[f"roi_head.{tower}.{3 * j + 1}.bias"] = _t(FPN, std=0.2)
    sd["roi_head.cls_subnet_pred.weight"] = _t(C * A, FPN, 3, 3)
    sd["roi_head.cls_subnet_pred.bias"] = _t(C * A, std=1.0)
    sd["roi_head.box_subnet_pred.weight"], sd["roi_head.box_subnet_pred.bias"] = _t(4 * A, FPN, 3, 3), _t(4 * A)
    sd["roi_head.iou_pred.weight"], sd["roi_head.iou_pred.bias"] = _t(A, FPN, 3, 3), _t(A)
    for name in ("pos_grad", "neg_grad", "pos_neg"):
        sd[f"post_process.cls_loss.{name}"] = torch.rand(C)
    return sd


# ------------------------------------------------------------------------- eql_d2 models


def build(config, opts, input_format="RGB"):
    settings = []
    for k, v in input_settings(input_format).items():
        settings += [k, str(v)]
    return tool.build_model_for(config, list(opts) + settings)


@pytest.fixture(scope="module")
def eqlv2_model():
    return build(EQLV2_CONFIG, RCNN_OPTS)


@pytest.fixture(scope="module")
def atss_model():
    return build(ATSS_CONFIG, ATSS_OPTS)


def assert_loads_exactly(model, state_dict):
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


# ------------------------------------------------------------------------------- mmdet


def test_mmdet_eqlv2_fills_the_model(eqlv2_model, tmp_path):
    cfg, model = eqlv2_model
    src = mmdet_mask_rcnn_state("EQLv2")
    assert detect_format(src) == "mmdet"
    conv = convert_state_dict(src, model.state_dict())
    assert list(conv.state_dict) == list(model.state_dict())
    assert_loads_exactly(model, conv.state_dict)
    # every source tensor has a place or a reason; nothing taken from the new model but state
    assert set(conv.mapped) | set(conv.dropped) == set(src)
    assert all(k.endswith("num_batches_tracked") or k.endswith("pos_neg") for k in conv.dropped)
    assert conv.from_model == {}
    # EQLv2's gradient statistics are carried over
    sd = model.state_dict()
    assert torch.equal(sd["roi_heads.box_predictor.cls_loss.pos_grad"],
                       src["roi_head.bbox_head.loss_cls.pos_grad"])
    # the file as train_net.py --eval-only loads it (eql_d2's strict check)
    from eql_d2.engine.checkpoint import load_weights
    path = tmp_path / "w.pth"
    torch.save({"model": conv.state_dict, "__author__": "test"}, path)
    load_weights(model, str(path))


def test_mmdet_softmax_and_rpn_keys(tmp_path):
    cfg, model = build(SOFTMAX_CONFIG, RCNN_OPTS)
    src = mmdet_mask_rcnn_state("softmax")
    conv = convert_state_dict(src, model.state_dict())
    assert_loads_exactly(model, conv.state_dict)
    assert set(conv.mapped) | set(conv.dropped) == set(src)
    for a, b in [("rpn_head.rpn_cls.weight", "proposal_generator.rpn_head.objectness_logits.weight"),
                 ("rpn_head.rpn_reg.bias", "proposal_generator.rpn_head.anchor_deltas.bias"),
                 ("neck.lateral_convs.0.conv.weight", "backbone.fpn_lateral2.weight"),
                 ("neck.fpn_convs.3.conv.bias", "backbone.fpn_output5.bias"),
                 ("roi_head.mask_head.convs.3.conv.weight", "roi_heads.mask_head.mask_fcn4.weight"),
                 ("roi_head.mask_head.upsample.weight", "roi_heads.mask_head.deconv.weight"),
                 ("backbone.layer4.2.bn3.running_var", "backbone.bottom_up.res5.2.conv3.norm.running_var"),
                 ("backbone.layer2.0.downsample.0.weight", "backbone.bottom_up.res3.0.shortcut.weight")]:
        assert torch.equal(conv.state_dict[b], src[a]), (a, b)
    # softmax: mmdetection's background row is last, as detectron2's
    x = torch.randn(7, FC)
    z_src = F.linear(x, src["roi_head.bbox_head.fc_cls.weight"], src["roi_head.bbox_head.fc_cls.bias"])
    z = model.roi_heads.box_predictor.cls_score(x)
    scores = model.roi_heads.box_predictor.cls_loss.scores(z)
    torch.testing.assert_close(scores, F.softmax(z_src, dim=1)[:, :-1])


@pytest.mark.parametrize("name", ["eql", "sigmoid"])
def test_mmdet_eql_and_sigmoid_heads(name):
    """mmdetection's EQL and sigmoid heads keep no loss buffers; EQL's category frequencies
    stay unknown (the model predicts; training takes them from the data)."""
    _, model = build(os.path.join(ROOT, f"configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_{name}.yaml"), RCNN_OPTS)
    conv = convert_state_dict(mmdet_mask_rcnn_state(name), model.state_dict())
    assert_loads_exactly(model, conv.state_dict)
    assert set(conv.from_model) == ({"roi_heads.box_predictor.cls_loss.freq"} if name == "eql" else set())


def test_backbone_and_fpn_compute_as_the_authors(eqlv2_model):
    """torchvision-style ResNet (stride in the 3x3 conv) with frozen BN, and mmdetection's
    FPN (nearest top-down, P6 = max-pool of P5), against the converted detectron2 modules."""
    cfg, model = eqlv2_model
    src = mmdet_mask_rcnn_state("EQLv2")
    model.load_state_dict(convert_state_dict(src, model.state_dict()).state_dict)
    net = torchvision_resnet50()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        c = []
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
            c.append(h)
        ours = model.backbone.bottom_up(x)
        for i, name in enumerate(["res2", "res3", "res4", "res5"]):
            torch.testing.assert_close(ours[name], c[i], rtol=1e-4, atol=1e-4)
        lat = [F.conv2d(ci, src[f"neck.lateral_convs.{i}.conv.weight"],
                        src[f"neck.lateral_convs.{i}.conv.bias"]) for i, ci in enumerate(c)]
        for i in (2, 1, 0):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        p = [F.conv2d(li, src[f"neck.fpn_convs.{i}.conv.weight"], src[f"neck.fpn_convs.{i}.conv.bias"],
                      padding=1) for i, li in enumerate(lat)]
        p.append(F.max_pool2d(p[-1], 1, stride=2))
        feats = model.backbone(x)
    for i, name in enumerate(["p2", "p3", "p4", "p5", "p6"]):
        torch.testing.assert_close(feats[name], p[i], rtol=1e-4, atol=1e-4)


def test_box_head_and_eqlv2_scores_compute_as_the_authors(eqlv2_model):
    cfg, model = eqlv2_model
    src = mmdet_mask_rcnn_state("EQLv2")
    model.load_state_dict(convert_state_dict(src, model.state_dict()).state_dict)
    bh = "roi_head.bbox_head"
    pooled = torch.randn(9, FPN, 7, 7)
    with torch.no_grad():
        h = pooled.flatten(1)
        for i in (0, 1):
            h = F.relu(F.linear(h, src[f"{bh}.shared_fcs.{i}.weight"], src[f"{bh}.shared_fcs.{i}.bias"]))
        cls_src = F.linear(h, src[f"{bh}.fc_cls.weight"], src[f"{bh}.fc_cls.bias"])
        reg_src = F.linear(h, src[f"{bh}.fc_reg.weight"], src[f"{bh}.fc_reg.bias"])
        logits, deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
        torch.testing.assert_close(logits, cls_src, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deltas, reg_src, rtol=1e-5, atol=1e-5)
        # mmdetection EQLv2.get_activation (test_with_obj): sigmoid, classes x (1 - objectness)
        p = torch.sigmoid(cls_src)
        expected = p[:, :-1] * (1 - p[:, -1:])
        torch.testing.assert_close(model.roi_heads.box_predictor.cls_loss.scores(logits), expected)
        # class-specific deltas: class j's box is [4j, 4j+4) in both
        j = 3
        torch.testing.assert_close(deltas.view(9, C, 4)[:, j], reg_src[:, 4 * j: 4 * j + 4])


def test_bgr_first_conv_sees_the_same_image():
    """--input-format BGR: reversed first-conv channels and statistics on a BGR image give
    the RGB-trained network's stem output, through detectron2's own preprocessing."""
    src = mmdet_mask_rcnn_state("softmax")
    outs = {}
    rgb = torch.randint(0, 256, (3, 64, 64)).float()
    for fmt in ("RGB", "BGR"):
        cfg, model = build(SOFTMAX_CONFIG, RCNN_OPTS, input_format=fmt)
        assert cfg.INPUT.FORMAT == fmt
        conv = convert_state_dict(src, model.state_dict(), input_format=fmt)
        model.load_state_dict(conv.state_dict)
        image = rgb if fmt == "RGB" else rgb.flip(0)
        with torch.no_grad():
            x = model.preprocess_image([{"image": image}]).tensor
            outs[fmt] = model.backbone.bottom_up.stem(x)
    net = torchvision_resnet50()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    with torch.no_grad():
        ref = net.maxpool(net.relu(net.bn1(net.conv1(((rgb - mean) / std)[None]))))
    for fmt in ("RGB", "BGR"):
        torch.testing.assert_close(outs[fmt], ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- UP


@pytest.mark.parametrize("stem_names", ["layer0", "torchvision"])
def test_up_atss_fills_the_model(atss_model, stem_names):
    cfg, model = atss_model
    src = up_atss_state(stem_names=stem_names)
    assert detect_format(src) == "up"
    conv = convert_state_dict(src, model.state_dict())
    assert list(conv.state_dict) == list(model.state_dict())
    assert_loads_exactly(model, conv.state_dict)
    assert set(conv.mapped) | set(conv.dropped) == set(src)
    # the head towers' convs had no bias: zeros; UP's EFL statistics are not carried over
    biases = {k for k in conv.from_model if not k.startswith("cls_loss.")}
    assert biases == {f"head.{t}.{3 * j}.bias" for t in ("cls_subnet", "bbox_subnet") for j in range(4)}
    assert all(not conv.state_dict[k].any() for k in biases)
    assert {k for k in conv.from_model if k.startswith("cls_loss.")} == {
        k for k in model.state_dict() if k.startswith("cls_loss.")}
    assert all(k.startswith("post_process.") or k.endswith("num_batches_tracked") for k in conv.dropped)


def test_up_r101_fills_the_r101_config():
    """The R101 improved baseline: torchvision's resnet101 names (23 res4 blocks)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.resnet101().state_dict().items()}
    src = collections.OrderedDict()
    for k, shape in shapes.items():
        if not k.startswith("fc."):
            k = "layer0.0." + k[len("conv1."):] if k.startswith("conv1.") else k
            k = "layer0.1." + k[len("bn1."):] if k.startswith("bn1.") else k
            src[f"backbone.{k}"] = torch.empty(shape)
    src.update((k, v) for k, v in up_atss_state().items() if not k.startswith("backbone."))
    _, model = build(os.path.join(ROOT, "configs/LVIS-v1/atss_R101_FPN_2x_rfs_efl.yaml"), ATSS_OPTS)
    conv = convert_state_dict(src, model.state_dict())
    assert_loads_exactly(model, conv.state_dict)
    assert "backbone.bottom_up.res4.22.conv3.norm.running_var" in conv.state_dict


def test_up_head_and_fpn_compute_as_the_authors(atss_model):
    """P3-P7 (P6 from the lateral of C5), GN towers without conv bias, and per-anchor class
    logits: UP's class-major channels read through its class_first permute equal eql_d2's
    anchor-major channels read as detectron2 reads them."""
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

    cfg, model = atss_model
    src = up_atss_state()
    model.load_state_dict(convert_state_dict(src, model.state_dict()).state_dict)
    net = torchvision_resnet50()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        c = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
            c.append(h)
        c = c[1:]
        lat = [F.conv2d(ci, src[f"neck.c{l}_lateral.weight"], src[f"neck.c{l}_lateral.bias"])
               for l, ci in zip((3, 4, 5), c)]
        p6 = F.conv2d(lat[2], src["neck.p6_conv.weight"], src["neck.p6_conv.bias"], stride=2, padding=1)
        p7 = F.conv2d(p6, src["neck.p7_conv.weight"], src["neck.p7_conv.bias"], stride=2, padding=1)
        for i in (1, 0):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        p = [F.conv2d(li, src[f"neck.p{l}_conv.weight"], src[f"neck.p{l}_conv.bias"], padding=1)
             for l, li in zip((3, 4, 5), lat)] + [p6, p7]
        feats = model.backbone(x)
        for i, name in enumerate(["p3", "p4", "p5", "p6", "p7"]):
            torch.testing.assert_close(feats[name], p[i], rtol=1e-4, atol=1e-4)

        def tower(name, f):
            for j in range(4):
                f = F.conv2d(f, src[f"roi_head.{name}.{3 * j}.weight"], padding=1)
                f = F.group_norm(f, 32, src[f"roi_head.{name}.{3 * j + 1}.weight"],
                                 src[f"roi_head.{name}.{3 * j + 1}.bias"])
                f = F.relu(f)
            return f

        feats = [torch.randn(2, FPN, hh, ww) for hh, ww in [(6, 5), (3, 3), (2, 2), (1, 2), (1, 1)]]
        logits, deltas, ious = model.head(feats)
        for f, z, d, q in zip(feats, logits, deltas, ious):
            b, _, hh, ww = f.shape
            k = A * hh * ww
            cls_f, box_f = tower("cls_subnet", f), tower("box_subnet", f)
            cls = F.conv2d(cls_f, src["roi_head.cls_subnet_pred.weight"], src["roi_head.cls_subnet_pred.bias"], padding=1)
            loc = F.conv2d(box_f, src["roi_head.box_subnet_pred.weight"], src["roi_head.box_subnet_pred.bias"], padding=1)
            iou = F.conv2d(box_f, src["roi_head.iou_pred.weight"], src["roi_head.iou_pred.bias"], padding=1)
            # UP IOUPostProcess.permute_preds with class_first=True
            cls = cls.view(b, -1, A, hh, ww).permute(0, 3, 4, 2, 1).reshape(b, k, -1)
            loc = loc.view(b, -1, A, 4, hh, ww).permute(0, 4, 5, 2, 1, 3).reshape(b, k, -1)
            iou = iou.view(b, -1, A, hh, ww).permute(0, 3, 4, 2, 1).reshape(b, k, -1)
            torch.testing.assert_close(permute_to_N_HWA_K(z, C), cls, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(permute_to_N_HWA_K(d, 4), loc, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(permute_to_N_HWA_K(q, 1), iou, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- errors, CLI


def test_errors_name_the_keys(eqlv2_model, atss_model):
    _, model = eqlv2_model
    src = mmdet_mask_rcnn_state("EQLv2")
    src["roi_head.bbox_head.extra_fc.weight"] = torch.zeros(1)
    del src["rpn_head.rpn_conv.bias"]
    src["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(C + 2, FC)
    with pytest.raises(ConversionError) as e:
        convert_state_dict(src, model.state_dict())
    msg = str(e.value)
    assert "roi_head.bbox_head.extra_fc.weight" in msg                       # no rule
    assert "proposal_generator.rpn_head.conv.bias" in msg                    # not filled
    assert "roi_head.bbox_head.fc_cls.weight [7, 64] -> roi_heads.box_predictor.cls_score.weight [6, 64]" in msg
    # a UP checkpoint into a Mask R-CNN: nothing fits
    _, atss = atss_model
    with pytest.raises(ConversionError, match=r"model keys nothing in the source fills: .*head\.cls_subnet\.0\.weight"):
        convert_state_dict(mmdet_mask_rcnn_state(), atss.state_dict(), "mmdet")
    with pytest.raises(ConversionError, match="cannot tell"):
        detect_format({"foo.weight": torch.zeros(1)})
    # checkpoint containers: mmdetection's state_dict, UP's model with DDP's prefix
    w = torch.zeros(2)
    assert list(source_state_dict({"meta": {}, "state_dict": {"a": w}})) == ["a"]
    assert list(source_state_dict({"model": {"module.a": w}, "epoch": 3})) == ["a"]


def test_cli_writes_weights_and_config_that_evaluate(tmp_path):
    from eql_d2.config import get_eql_cfg
    from eql_d2.engine.checkpoint import load_weights

    src_path = tmp_path / "eqlv2_1x.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": mmdet_mask_rcnn_state("EQLv2")}, src_path)
    out = tmp_path / "out" / "eqlv2.pth"
    conv, config_out = tool.main([str(src_path), str(out), "--config-file", EQLV2_CONFIG,
                                  "--input-format", "BGR"] + RCNN_OPTS)
    saved = torch.load(out, map_location="cpu")
    assert set(saved) == {"model", "__author__", "source"} and "eqlv2" in saved["__author__"]
    with open(config_out) as f:
        written = yaml.safe_load(f)
    assert written["_BASE_"] == EQLV2_CONFIG
    assert written["MODEL"]["RESNETS"]["STRIDE_IN_1X1"] is False
    assert written["INPUT"]["FORMAT"] == "BGR"
    assert written["MODEL"]["PIXEL_MEAN"] == [103.53, 116.28, 123.675]
    assert written["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == C
    # the written config builds the model the weights fit, strictly (train_net.py --eval-only)
    cfg = get_eql_cfg(config_out, ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.WEIGHTS == str(out) and cfg.MODEL.PIXEL_STD == [57.375, 57.12, 58.395]
    _, model = tool.build_model_for(config_out, [])
    load_weights(model, cfg.MODEL.WEIGHTS)
    # a pickle with objects other than tensors is refused without --trust-pickle
    odd = tmp_path / "odd.pth"
    torch.save({"meta": MetaObject(), "state_dict": {}}, odd)
    with pytest.raises(SystemExit, match="--trust-pickle"):
        tool.load_checkpoint(str(odd))
