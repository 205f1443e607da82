"""tools/backbone_weights.py: a trained detector's ResNet kept as a backbone file, which
another detector (other FPN, heads and classes) loads through MODEL.WEIGHTS as it loads
ImageNet weights."""

import os
import warnings

import pytest
import torch
from helpers import ROOT, load_script

from eql_d2.config import get_eql_cfg
from eql_d2.engine.checkpoint import AtomicCheckpointer
from eql_d2.utils.statistics import StatisticsRestartWarning

tool = load_script("tools/backbone_weights.py")

HT = os.path.join(ROOT, "configs/Synthetic-HardTail")


def _model(config, *opts):
    from detectron2.modeling import build_model

    torch.manual_seed(len(opts))
    return build_model(get_eql_cfg(os.path.join(HT, config), list(opts)))


def test_a_pretrained_resnet_initialises_another_detectors_backbone(tmp_path, one_thread):
    # the pre-training detector: Faster R-CNN with 200 classes; its weights made distinct
    source = _model("Pretrain/faster_rcnn_R18_FPN_d2heads_softmax_pretrain.yaml")
    with torch.no_grad():
        for i, p in enumerate(source.parameters()):
            p.fill_(0.001 * (i + 1))
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": source.state_dict(), "iteration": 5335}, checkpoint)
    out = tmp_path / "backbone.pth"
    tool.main([str(checkpoint), str(out)])
    saved = torch.load(out, weights_only=False)
    assert list(saved) == ["model"]
    resnet = {k: v for k, v in source.state_dict().items() if k.startswith("backbone.bottom_up.")}
    assert list(saved["model"]) == list(resnet) and len(resnet) > 50
    assert not any(k.startswith("backbone.fpn") for k in saved["model"])

    # ATSS with 60 classes (another FPN builder, other heads) starts from it
    target = _model("atss_R18_FPN_focal.yaml", "MODEL.DEVICE", "cpu")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with warnings.catch_warnings():
        # a backbone file has no loss statistics to restart: loading it says nothing of them
        warnings.simplefilter("error", StatisticsRestartWarning)
        AtomicCheckpointer(target).resume_or_load(str(out), resume=False)
    after = target.state_dict()
    for key, value in after.items():
        if key in resnet:
            assert torch.equal(value, resnet[key]), key
        else:  # FPN, head, loss state: their own initialisation
            assert torch.equal(value, before[key]), key
    assert set(resnet) <= set(after)


def test_a_file_without_the_prefix_is_refused_naming_it(tmp_path, capsys):
    checkpoint = tmp_path / "classifier.pth"
    torch.save({"model": {"backbone.res2.weight": torch.zeros(1)}}, checkpoint)
    with pytest.raises(SystemExit, match="no tensor name starts with 'backbone.bottom_up.'"):
        tool.main([str(checkpoint), str(tmp_path / "out.pth")])
    assert not os.path.exists(tmp_path / "out.pth")
    torch.save([1, 2], checkpoint)
    with pytest.raises(SystemExit, match="not a detectron2 checkpoint"):
        tool.main([str(checkpoint), str(tmp_path / "out.pth")])


def test_a_half_precision_file_loads_as_the_rounded_float32_weights(tmp_path, one_thread):
    source = _model("Pretrain/faster_rcnn_R18_FPN_d2heads_softmax_pretrain.yaml")
    with torch.no_grad():
        for i, p in enumerate(source.parameters()):
            p.normal_(generator=torch.Generator().manual_seed(i))
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": source.state_dict()}, checkpoint)
    out = tmp_path / "backbone_half.pth"
    tool.main([str(checkpoint), str(out), "--half"])
    saved = torch.load(out, weights_only=False)["model"]
    resnet = {k: v for k, v in source.state_dict().items() if k.startswith("backbone.bottom_up.")}
    assert list(saved) == list(resnet)
    for key, value in saved.items():
        expected = resnet[key].half() if resnet[key].is_floating_point() else resnet[key]
        assert value.dtype == expected.dtype and torch.equal(value, expected), key

    target = _model("atss_R18_FPN_focal.yaml", "MODEL.DEVICE", "cpu")
    AtomicCheckpointer(target).resume_or_load(str(out), resume=False)
    after = target.state_dict()
    for key, value in resnet.items():
        assert after[key].dtype == value.dtype, key
        rounded = value.half().to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(after[key], rounded), key
    # float16 rounding moves the weights, but by less than its resolution
    moved = [(after[k] - v).abs().max().item() for k, v in resnet.items() if v.is_floating_point()]
    assert 0 < max(moved) < 1e-2
