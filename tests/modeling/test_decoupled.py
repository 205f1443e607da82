"""The decoupled second stage (DecoupledRCNN): started from a first-stage checkpoint, a run
changes only the parameters named in MODEL.DECOUPLED.TRAINABLE (every other tensor equal to
the first stage's), and its checkpoint alone evaluates to the same metrics."""

import json
import os

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models and losses)
from helpers import ROOT, TINY_RCNN, register_small
from eql_d2.config import get_eql_cfg
from eql_d2.engine import AtomicCheckpointer, Trainer
from eql_d2.modeling.meta_arch import LWSLinear, freeze_except

RCNN_CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_softmax.yaml")
CLS_SCORE = "roi_heads.box_predictor.cls_score"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def datasets(small_synthetic):
    return register_small(small_synthetic, "decoupled_small")


def _cfg(datasets, out, *opts, evaluate=False):
    return get_eql_cfg(RCNN_CFG, [
        *TINY_RCNN, "SOLVER.MAX_ITER", "2", "DATASETS.TRAIN", (datasets[0],),
        "DATASETS.TEST", (datasets[1],) if evaluate else (), "TEST.EVAL_PERIOD", "0",
        "TEST.EVAL.PER_CATEGORY_OUTPUTS", "False", "SEED", "3", "OUTPUT_DIR", str(out), *opts])


def _train(cfg):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer, trainer.train()


@pytest.fixture(scope="module")
def first_stage(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("first_stage")
    _train(_cfg(datasets, out))
    path = os.path.join(str(out), "model_final.pth")
    return path, torch.load(path, map_location="cpu", weights_only=False)["model"]


SECOND_STAGES = {
    # cRT: the classifier re-initialised and re-trained with class-balanced sampling
    "cRT": ([CLS_SCORE], ["MODEL.DECOUPLED.REINITIALIZE", (CLS_SCORE,),
                          "DATALOADER.SAMPLER_TRAIN", "ClassBalancedSampler"]),
    # LWS: the classifier kept, a per-class scale of its weights learnt
    "LWS": ([CLS_SCORE + ".weight_scale"], ["MODEL.DECOUPLED.WEIGHT_SCALING", "True",
                                            "DATALOADER.SAMPLER_TRAIN", "ClassAwareSampler"]),
    # BAGS: a new group-softmax classifier
    "BAGS": ([CLS_SCORE], ["MODEL.DECOUPLED.REINITIALIZE", (CLS_SCORE,),
                           "MODEL.CLS_LOSS.NAME", "BAGS"]),
}


@pytest.mark.parametrize("method", sorted(SECOND_STAGES))
def test_second_stage_changes_only_the_named_parameters(method, datasets, first_stage,
                                                        tmp_path):
    weights, before = first_stage
    trainable, opts = SECOND_STAGES[method]
    evaluate = method == "cRT"
    cfg = _cfg(datasets, tmp_path, "MODEL.META_ARCHITECTURE", "DecoupledRCNN",
               "MODEL.WEIGHTS", weights, "MODEL.DECOUPLED.TRAINABLE", tuple(trainable), *opts,
               evaluate=evaluate)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    # loaded: the first stage's classifier, unless re-initialised
    loaded = dict(trainer.model.named_parameters())
    if method != "BAGS":
        assert torch.equal(loaded[CLS_SCORE + ".weight"], before[CLS_SCORE + ".weight"]) == (
            method == "LWS")
    assert torch.equal(loaded["backbone.bottom_up.stem.conv1.weight"],
                       before["backbone.bottom_up.stem.conv1.weight"])
    results = trainer.train()
    after = torch.load(os.path.join(str(tmp_path), "model_final.pth"), map_location="cpu",
                       weights_only=False)["model"]
    named = [k for k in after if any(k == t or k.startswith(t + ".") for t in trainable)]
    assert named
    # every tensor outside the trainable modules is the first stage's, bit for bit
    for k, v in after.items():
        if k in named or k == "decoupled_stage":
            continue
        if method == "BAGS" and (k.startswith(CLS_SCORE) or ".cls_loss." in k):
            continue  # the new classifier's own layout and the loss's groups (below)
        assert torch.equal(v, before[k]), k
    # and what trained has moved
    assert all(not torch.equal(after[k], before[k]) for k in named if k in before)
    assert all(float((after[k] - 1).abs().max()) > 0 for k in named if k not in before)
    if method == "LWS":
        assert isinstance(trainer.model.roi_heads.box_predictor.cls_score, LWSLinear)
        assert torch.equal(after[CLS_SCORE + ".weight"], before[CLS_SCORE + ".weight"])
    if method == "BAGS":
        c = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        assert after[CLS_SCORE + ".linear.weight"].shape[0] == c + 2 + 4
        assert not any(k.startswith(CLS_SCORE + ".") and k[len(CLS_SCORE) + 1:] in
                       ("weight", "bias") for k in after)
        assert after["roi_heads.box_predictor.cls_loss.groups"].shape == (c,)
    # the optimizer holds the trainable parameters only
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in trainer.model.named_parameters() if n in named}
    if evaluate:
        # --resume continues the second stage: its own checkpoint loads whole, the
        # classifier is not re-initialised again
        resumed = Trainer(cfg)
        resumed.resume_or_load(resume=True)
        assert all(torch.equal(v, after[k]) for k, v in resumed.model.state_dict().items())
        # the second-stage checkpoint alone (no first-stage weights) gives the same metrics
        cfg.MODEL.WEIGHTS = ""
        fresh = Trainer.build_model(cfg)
        AtomicCheckpointer(fresh, for_inference=True).load(
            os.path.join(str(tmp_path), "model_final.pth"))
        assert all(torch.equal(v, after[k]) for k, v in fresh.state_dict().items())
        again = Trainer.test(cfg, fresh)
        assert "bbox" in again and json.dumps(again, sort_keys=True) == json.dumps(
            results, sort_keys=True)


def test_frozen_batch_norm_stays_frozen_and_names_are_checked():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4),
                          nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)))
    model[1].running_mean.uniform_()
    first_stage = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_except(model, ["3"], "MODEL.DECOUPLED.TRAINABLE")
    # the first stage's BatchNorm entries (batch count included) load into the frozen layer
    model.load_state_dict(first_stage, strict=True)
    assert torch.equal(model[1].running_mean, first_stage["1.running_mean"])
    assert isinstance(model[1], FrozenBatchNorm2d)  # no trainable parameter left: frozen
    assert isinstance(model[3][1], nn.BatchNorm2d)  # inside a trainable module: trains
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "3.0.weight", "3.0.bias", "3.1.weight", "3.1.bias"]
    stats = model[1].running_mean.clone()
    model.train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.equal(model[1].running_mean, stats)
    assert model[0].weight.grad is None and model[2].weight.grad is None
    with pytest.raises(ValueError, match=r"MODEL.DECOUPLED.TRAINABLE: 'roi_heads.cls' is no "
                                         "module or parameter"):
        freeze_except(model, ["roi_heads.cls"], "MODEL.DECOUPLED.TRAINABLE")
    with pytest.raises(ValueError, match="MODEL.DECOUPLED.TRAINABLE is empty"):
        freeze_except(model, [], "MODEL.DECOUPLED.TRAINABLE")


def test_a_second_stage_without_first_stage_weights_is_refused(datasets, tmp_path):
    cfg = _cfg(datasets, tmp_path, "MODEL.META_ARCHITECTURE", "DecoupledRCNN")
    model = Trainer.build_model(cfg).train()
    with pytest.raises(ValueError, match="no weights were loaded: set MODEL.WEIGHTS"):
        model([{}])


def test_a_second_stage_reads_image_level_labels_as_its_r_cnn_does():
    """needs_image_labels (what makes the trainer map LVIS image-level labels) holds for
    R-CNN subclasses such as DecoupledRCNN, and the trainer checks their class count."""
    from eql_d2.engine.trainer import NUM_CLASSES_KEYS
    from eql_d2.modeling.roi_heads import needs_image_labels

    def cfg(*opts):
        return get_eql_cfg(RCNN_CFG, ["MODEL.ROI_HEADS.NAME", "EQLROIHeads", *opts])

    for arch in ("GeneralizedRCNN", "DecoupledRCNN"):
        assert needs_image_labels(cfg("MODEL.META_ARCHITECTURE", arch, "MODEL.CLS_LOSS.NAME", "EQL"))
        assert not needs_image_labels(cfg("MODEL.META_ARCHITECTURE", arch))  # softmax: no mask
        assert NUM_CLASSES_KEYS[arch] == "MODEL.ROI_HEADS.NUM_CLASSES"
    assert not needs_image_labels(cfg("MODEL.META_ARCHITECTURE", "ATSS"))
