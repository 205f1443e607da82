"""Weights that do not fit the model are refused naming the file and the keys; backbone
files still initialise training; --resume refuses another classification loss."""

import logging
import os
import pickle

import pytest
import torch

from helpers import ROOT

from eql_d2.engine.checkpoint import (AtomicCheckpointer, IncompatibleWeightsError,
                                      classification_losses, load_weights)


def build(config, *opts):
    import eql_d2.modeling  # noqa: F401
    from detectron2.modeling import build_model

    from eql_d2.config import get_eql_cfg

    cfg = get_eql_cfg(os.path.join(ROOT, "configs", "Synthetic-LT", config),
                      ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
                       *opts])
    torch.manual_seed(0)
    return build_model(cfg), cfg


EQLV2 = "EQL/faster_rcnn_R18_FPN_eqlv2.yaml"
SIGMOID = "EQL/faster_rcnn_R18_FPN_sigmoid.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    """Weights of an 8-class EQLv2 Faster R-CNN, a 20-class one, an 8-class ATSS, and the
    backbone of the first alone (a .pth and an ImageNet-style .pkl)."""
    folder = tmp_path_factory.mktemp("weights")
    model, _ = build(EQLV2, "MODEL.ROI_HEADS.NUM_CLASSES", "8")
    AtomicCheckpointer(model, str(folder)).save("rcnn8")
    other, _ = build(EQLV2, "MODEL.ROI_HEADS.NUM_CLASSES", "20")
    AtomicCheckpointer(other, str(folder)).save("rcnn20")
    atss, _ = build("atss_R18_FPN_efl.yaml", "MODEL.ATSS.NUM_CLASSES", "8")
    AtomicCheckpointer(atss, str(folder)).save("atss8")
    state = model.state_dict()
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.")}},
               folder / "backbone.pth")
    # detectron2 model-zoo layout of ImageNet weights: bottom-up names, numpy arrays
    prefix = "backbone.bottom_up."
    with open(folder / "imagenet.pkl", "wb") as f:
        pickle.dump({"model": {k[len(prefix):]: v.numpy() for k, v in state.items()
                               if k.startswith(prefix)},
                     "__author__": "test", "matching_heuristics": True}, f)
    return {name: str(folder / name) for name in
            ("rcnn8.pth", "rcnn20.pth", "atss8.pth", "backbone.pth", "imagenet.pkl")}


@pytest.fixture
def rcnn8(one_thread):
    return build(EQLV2, "MODEL.ROI_HEADS.NUM_CLASSES", "8")[0]


def test_weights_of_another_class_count_are_refused(files, rcnn8):
    with pytest.raises(IncompatibleWeightsError) as e:
        load_weights(rcnn8, files["rcnn20.pth"])
    msg = str(e.value)
    assert msg.startswith(files["rcnn20.pth"])
    assert "4 of another shape" in msg
    assert "roi_heads.box_predictor.cls_score.weight [21, 256] vs [9, 256]" in msg
    assert "MODEL.WEIGHTS_PARTIAL" in msg


def test_weights_of_another_detector_are_refused(files, rcnn8):
    with pytest.raises(IncompatibleWeightsError) as e:
        load_weights(rcnn8, files["atss8.pth"])
    msg = str(e.value)
    assert files["atss8.pth"] in msg
    assert "missing from the file" in msg and "proposal_generator.rpn_head.conv.weight" in msg
    assert "26 not in the model" in msg and "head.cls_subnet.0.weight" in msg
    assert "(26 in all)" in msg  # the first ten and the count


def test_matching_weights_load_and_loss_state_is_not_an_error(files, rcnn8):
    load_weights(rcnn8, files["rcnn8.pth"])
    # EQLv2's gradient statistics are unknown to a sigmoid model: not an error
    sigmoid, _ = build(SIGMOID, "MODEL.ROI_HEADS.NUM_CLASSES", "8")
    load_weights(sigmoid, files["rcnn8.pth"])
    expected = torch.load(files["rcnn8.pth"], weights_only=False)["model"]
    for k, v in sigmoid.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_backbone_files_initialise_training_but_not_prediction(files, rcnn8):
    for name in ("backbone.pth", "imagenet.pkl"):
        AtomicCheckpointer(rcnn8).resume_or_load(files[name], resume=False)
        with pytest.raises(IncompatibleWeightsError, match="roi_heads.box_head.fc1.weight"):
            load_weights(rcnn8, files[name])
    # weights with heads that do not fit are refused for training too
    with pytest.raises(IncompatibleWeightsError, match="model's heads.*cls_score.weight"):
        AtomicCheckpointer(rcnn8).resume_or_load(files["rcnn20.pth"], resume=False)


def test_partial_loading_is_explicit(files, rcnn8, caplog):
    before = rcnn8.roi_heads.box_predictor.cls_score.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="eql_d2"):
        load_weights(rcnn8, files["rcnn20.pth"], partial=True)
    assert any("MODEL.WEIGHTS_PARTIAL is True" in r.getMessage() and
               "cls_score.weight" in r.getMessage() for r in caplog.records)
    assert torch.equal(rcnn8.roi_heads.box_predictor.cls_score.weight, before)
    saved = torch.load(files["rcnn20.pth"], weights_only=False)["model"]
    fc1 = "roi_heads.box_head.fc1.weight"
    assert torch.equal(rcnn8.state_dict()[fc1], saved[fc1])

    # the Trainer's checkpointer takes MODEL.WEIGHTS_PARTIAL from the trainer's config
    class Trainer:
        def __init__(self, partial):
            _, self.cfg = build(EQLV2, "MODEL.WEIGHTS_PARTIAL", str(partial))

        def state_dict(self):
            return {}

    AtomicCheckpointer(rcnn8, trainer=Trainer(True)).resume_or_load(files["rcnn20.pth"],
                                                                   resume=False)
    with pytest.raises(IncompatibleWeightsError):
        AtomicCheckpointer(rcnn8, trainer=Trainer(False)).resume_or_load(files["rcnn20.pth"],
                                                                        resume=False)


def test_resume_refuses_another_classification_loss(files, tmp_path, one_thread):
    run = str(tmp_path / "run")
    os.makedirs(run)
    eqlv2, _ = build(EQLV2, "MODEL.ROI_HEADS.NUM_CLASSES", "8")
    AtomicCheckpointer(eqlv2, run).save("model_0000009")
    assert torch.load(os.path.join(run, "model_0000009.pth"), weights_only=False)[
        "cls_losses"] == {"roi_heads.box_predictor.cls_loss": "EQLv2"}
    sigmoid, _ = build(SIGMOID, "MODEL.ROI_HEADS.NUM_CLASSES", "8")
    assert classification_losses(sigmoid) == {"roi_heads.box_predictor.cls_loss": "SigmoidCE"}
    with pytest.raises(ValueError) as e:
        AtomicCheckpointer(sigmoid, run).resume_or_load("", resume=True)
    msg = str(e.value)
    assert "model_0000009.pth" in msg
    assert "EQLv2 at roi_heads.box_predictor.cls_loss" in msg
    assert "SigmoidCE at roi_heads.box_predictor.cls_loss" in msg
    # the same loss resumes; another loss may start a new run from the weights
    AtomicCheckpointer(eqlv2, run).resume_or_load("", resume=True)
    AtomicCheckpointer(sigmoid, run).resume_or_load(os.path.join(run, "model_0000009.pth"),
                                                    resume=False)

    # a checkpoint that does not record its loss: told by the loss's state
    torch.save({"model": eqlv2.state_dict()}, os.path.join(run, "old.pth"))
    with open(os.path.join(run, "last_checkpoint"), "w") as f:
        f.write("old.pth")
    with pytest.raises(ValueError, match="old.pth holds classification-loss state "
                                         "roi_heads.box_predictor.cls_loss.neg_grad, "
                                         "roi_heads.box_predictor.cls_loss.pos_grad.*SigmoidCE"):
        AtomicCheckpointer(sigmoid, run).resume_or_load("", resume=True)


def test_empty_last_checkpoint_is_named(tmp_path, rcnn8):
    (tmp_path / "last_checkpoint").write_text("\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'last_checkpoint'} is empty"):
        AtomicCheckpointer(rcnn8, str(tmp_path)).resume_or_load("", resume=True)
