"""The classification-loss registry: a loss registered in a few lines trains the two-stage
and the dense heads without touching them; every registered loss trains in every head that
accepts it, and a fresh model loaded from its checkpoint evaluates to the same metrics."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models and losses)
from helpers import ROOT, TINY_ONE_STAGE, TINY_RCNN, register_small
from eql_d2.config import get_eql_cfg
from eql_d2.engine import AtomicCheckpointer, Trainer
from eql_d2.modeling.cls_losses import CLS_LOSS_REGISTRY, ClassificationLoss, losses_for_head

RCNN_CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_softmax.yaml")
ATSS_CFG = os.path.join(ROOT, "configs/Synthetic-LT/atss_R18_FPN_focal.yaml")


# ---- a new loss with its own config node: weighted sigmoid CE (registered by a fixture) ----
class WeightedSigmoidCEForTest(torch.nn.Module, ClassificationLoss):
    heads = ("two_stage", "dense")

    def __init__(self, num_classes, weight=0.5):
        super().__init__()
        self.num_classes = num_classes
        self.weight = weight
        self.calls = []

    config_node = "WEIGHTED_SIGMOID_CE_FOR_TEST"
    settings = {"WEIGHT": (0.5, "weight", "factor of the loss")}

    def head_loss(self, *args, **kwargs):
        self.calls.append((len(args), sorted(kwargs)))
        logits, labels, avg_factor = args
        keep = labels >= 0
        z, y = logits[keep, : self.num_classes], labels[keep]
        target = F.one_hot(y, self.num_classes + 1)[:, : self.num_classes].to(z.dtype)
        total = F.binary_cross_entropy_with_logits(z, target, reduction="sum")
        return self.weight * total / avg_factor


@pytest.fixture(scope="module")
def test_loss_registered():
    """Registered for this module only: configs of other tests' processes must not carry
    its node (a config.yaml with it would not load where the loss is not defined)."""
    CLS_LOSS_REGISTRY.register(WeightedSigmoidCEForTest)
    yield
    CLS_LOSS_REGISTRY._obj_map.pop(WeightedSigmoidCEForTest.__name__)


@pytest.fixture(scope="module")
def datasets(small_synthetic):
    return register_small(small_synthetic, "registry_small")


def _cfg(head, loss, datasets, out):
    base, tiny, key = ((RCNN_CFG, TINY_RCNN, "MODEL.CLS_LOSS.NAME") if head == "two_stage" else
                       (ATSS_CFG, TINY_ONE_STAGE, "MODEL.CLS_LOSS.NAME"))
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
def test_a_loss_registered_elsewhere_trains_without_touching_the_heads(
        head, datasets, tmp_path, one_thread, test_loss_registered):
    cfg = _cfg(head, "weighted_sigmoid_ce_for_test", datasets, tmp_path)
    assert cfg.MODEL.CLS_LOSS.WEIGHTED_SIGMOID_CE_FOR_TEST.WEIGHT == 0.5  # its own node
    cfg.MODEL.CLS_LOSS.WEIGHTED_SIGMOID_CE_FOR_TEST.WEIGHT = 0.25
    trainer, _ = _train(cfg)
    loss = _loss_module(trainer.model, head)
    assert type(loss) is WeightedSigmoidCEForTest and loss.weight == 0.25
    # one call convention for both head families: (logits, labels, avg_factor) and the
    # optional inputs the loss declares, here none
    assert loss.calls == [(3, [])] * 3
    values = [v for v, _ in trainer.storage.histories()["loss_cls"].values()]
    assert len(values) == 3 and all(torch.isfinite(torch.tensor(values)))


def test_heads_pass_exactly_the_declared_inputs(monkeypatch, datasets, tmp_path, one_thread):
    """EQLv2 (declares verified) in Faster R-CNN and EQFL (declares quality) in ATSS get
    (logits, labels, avg_factor) plus their declared input and nothing else."""
    seen = []
    for head, name in (("two_stage", "EQLv2"), ("dense", "EQFL")):
        cls = CLS_LOSS_REGISTRY.get(name)
        original = cls.head_loss

        def spy(self, *args, _original=original, **kwargs):
            seen.append((type(self).__name__, len(args), sorted(kwargs)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "head_loss", spy)
        _train(_cfg(head, name, datasets, tmp_path / head))
    assert seen == [("EQLv2", 3, ["verified"])] * 3 + [("EQFL", 3, ["quality"])] * 3


CASES = [(head, name) for head in ("two_stage", "dense") for name in losses_for_head(head)]


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
