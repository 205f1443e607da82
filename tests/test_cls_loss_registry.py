"""The classification-loss registry: a loss registered in a few lines trains the two-stage
and the dense heads without touching them; every registered loss trains in every head that
accepts it, and a fresh model loaded from its checkpoint evaluates to the same metrics."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models and losses)
from conftest import ROOT, TINY_ONE_STAGE, TINY_RCNN, register_small
from eql_d2.config import get_eql_cfg
from eql_d2.engine import AtomicCheckpointer, Trainer
from eql_d2.modeling.cls_losses import CLS_LOSS_REGISTRY, ClassificationLoss, losses_for_head

RCNN_CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_softmax.yaml")
ATSS_CFG = os.path.join(ROOT, "configs/Synthetic-LT/atss_R18_FPN_focal.yaml")


# ---- a new loss, registered here: sigmoid CE on the C classes, weighted by 1/2 ----
@CLS_LOSS_REGISTRY.register()
class HalfSigmoidCEForTest(torch.nn.Module, ClassificationLoss):
    heads = ("two_stage", "dense")

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.calls = 0

    def head_loss(self, logits, labels, *, normalizer=None, **unused):
        self.calls += 1
        keep = labels >= 0
        z, y = logits[keep, : self.num_classes], labels[keep]
        target = F.one_hot(y, self.num_classes + 1)[:, : self.num_classes].to(z.dtype)
        total = 0.5 * F.binary_cross_entropy_with_logits(z, target, reduction="sum")
        return total / (len(z) if normalizer is None else normalizer)


@pytest.fixture(scope="module")
def datasets(small_synthetic):
    return register_small(small_synthetic, "registry_small")


def _cfg(head, loss, datasets, out):
    base, tiny, key = ((RCNN_CFG, TINY_RCNN, "MODEL.EQL.LOSS") if head == "two_stage" else
                       (ATSS_CFG, TINY_ONE_STAGE, "MODEL.EFL.LOSS"))
    return get_eql_cfg(base, [*tiny, key, loss, "DATASETS.TRAIN", (datasets[0],),
                              "DATASETS.TEST", (datasets[1],), "TEST.EVAL_PERIOD", "0",
                              "TEST.EVAL.PER_CATEGORY_OUTPUTS", "False",
                              "DATALOADER.SAMPLER_TRAIN", "TrainingSampler",
                              "SEED", "3", "OUTPUT_DIR", str(out)])


def _train(cfg):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    return trainer, results


def _loss_module(model, head):
    return model.roi_heads.box_predictor.cls_loss if head == "two_stage" else model.cls_loss.criterion


@pytest.mark.parametrize("head", ["two_stage", "dense"])
def test_a_loss_registered_elsewhere_trains_without_touching_the_heads(head, datasets,
                                                                        tmp_path, one_thread):
    trainer, _ = _train(_cfg(head, "half_sigmoid_ce_for_test", datasets, tmp_path))
    loss = _loss_module(trainer.model, head)
    assert type(loss) is HalfSigmoidCEForTest and loss.calls == 3
    values = [v for v, _ in trainer.storage.histories()["loss_cls"].values()]
    assert len(values) == 3 and all(torch.isfinite(torch.tensor(values)))


CASES = [("two_stage", name) for name in losses_for_head("two_stage")
         if name != "HalfSigmoidCEForTest"] + \
        [("dense", name) for name in losses_for_head("dense") if name != "HalfSigmoidCEForTest"]


@pytest.mark.parametrize("head,loss", CASES)
def test_every_registered_loss_trains_and_its_checkpoint_evaluates_the_same(
        head, loss, datasets, tmp_path, one_thread):
    cfg = _cfg(head, loss, datasets, tmp_path)
    trainer, results = _train(cfg)
    hist = trainer.storage.histories()
    losses = [k for k in hist if k.startswith("loss_")]
    assert losses and all(torch.isfinite(torch.tensor([v for v, _ in hist[k].values()])).all()
                          for k in losses)
    assert type(_loss_module(trainer.model, head)).__name__ == loss
    fresh = Trainer.build_model(cfg)
    AtomicCheckpointer(fresh, save_dir=str(tmp_path)).load(
        os.path.join(str(tmp_path), "model_final.pth"))
    # everything the loss keeps (statistics, counts, frequencies) comes back from the file
    trained = trainer.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    again = Trainer.test(cfg, fresh)
    # NaN-aware: after 3 iterations some losses put every score under the test threshold
    assert "bbox" in again and json.dumps(again, sort_keys=True) == json.dumps(results,
                                                                              sort_keys=True)
