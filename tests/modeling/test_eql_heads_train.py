"""Faster / Mask R-CNN with EQLROIHeads train on CPU with each loss, evaluate with
LVISEvaluator from their checkpoint, and carry EQLv2's statistics through checkpoints.

Runs are tiny (2 iterations on the 8-category 64 px Synthetic-LT); longer runs are in
docs/MODEL_ZOO.md.
"""

import json
import math
import os
import shutil

import pytest
import torch
from detectron2.data import DatasetCatalog

import eql_d2.modeling  # noqa: F401  (registers EQLROIHeads)
from helpers import ROOT, TINY_RCNN, run_train_net
from eql_d2.config import get_eql_cfg
from eql_d2.data import load_category_metadata, register_lvis_format
from eql_d2.engine import AtomicCheckpointer, Trainer

TRAIN, VAL = "eqlh_small_train", "eqlh_small_val"
# An untrained model keeps 300 boxes per image above the 1e-4 threshold; pasting and
# scoring that many masks is most of a test's time, and 20 exercise the same code.
FEW_DETECTIONS = ["TEST.DETECTIONS_PER_IMAGE", "20"]
STATS = ("roi_heads.box_predictor.cls_loss.pos_grad", "roi_heads.box_predictor.cls_loss.neg_grad")


@pytest.fixture(scope="module")
def datasets(small_synthetic):
    for name, split in ((TRAIN, "train"), (VAL, "val")):
        if name not in DatasetCatalog.list():
            register_lvis_format(name, os.path.join(small_synthetic, f"lvis_v1_{split}.json"),
                                 small_synthetic)
        load_category_metadata(name)
    return small_synthetic


def make_cfg(arch, loss, out, *opts):
    cfg = get_eql_cfg(
        os.path.join(ROOT, f"configs/Synthetic-LT/EQL/{arch}_rcnn_R18_FPN_{loss}.yaml"))
    cfg.merge_from_list([*TINY_RCNN, *FEW_DETECTIONS, "SOLVER.MAX_ITER", "2",
                         "DATASETS.TRAIN", (TRAIN,), "DATASETS.TEST", (VAL,),
                         "MODEL.CLS_LOSS.LOG_PERIOD", "1", "OUTPUT_DIR", out, *opts])
    return cfg


def train(cfg):
    """Train without the end-of-training evaluation (the eval-only path evaluates)."""
    cfg = cfg.clone()
    cfg.DATASETS.TEST = ()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def eval_only(cfg, weights):
    """What ``train_net.py --eval-only`` does: build, load MODEL.WEIGHTS, test."""
    model = Trainer.build_model(cfg)
    AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(weights, resume=False)
    return Trainer.test(cfg, model), model


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("arch", ["faster", "mask"])
@pytest.mark.parametrize("loss", ["softmax", "sigmoid", "eql", "eqlv2"])  # config file names
def test_trains_with_finite_loss_and_eval_only_runs_lvis_evaluator(datasets, tmp_path, arch, loss):
    cfg = make_cfg(arch, loss, str(tmp_path))
    train(cfg)
    records = [r for r in read_metrics(str(tmp_path)) if "total_loss" in r]
    assert records and all(math.isfinite(r["total_loss"]) for r in records)
    if loss == "eqlv2":
        assert all(math.isfinite(records[-1][f"eqlv2/gradient_ratio/{g}"]) for g in "rcf")
    results, _ = eval_only(cfg, os.path.join(str(tmp_path), "model_final.pth"))
    tasks = ("bbox", "segm") if arch == "mask" else ("bbox",)
    assert sorted(results) == sorted(tasks)
    for task in tasks:
        for key in ("AP", "APr", "APc", "APf"):
            assert isinstance(results[task][key], float)


@pytest.fixture(scope="module")
def eqlv2_run(datasets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eqlv2"))
    cfg = make_cfg("faster", "eqlv2", out)
    train(cfg)
    return cfg, out


def test_eqlv2_statistics_survive_checkpoints_bit_for_bit(eqlv2_run):
    cfg, out = eqlv2_run
    weights = os.path.join(out, "model_final.pth")
    saved = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    assert all(saved[k].abs().sum() > 0 for k in STATS)
    model = Trainer.build_model(cfg)  # loaded as train_net.py --eval-only loads it
    AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(weights, resume=False)
    state = model.state_dict()
    for k in STATS:
        assert torch.equal(state[k], saved[k])


def test_resume_continues_from_the_eqlv2_statistics(eqlv2_run, tmp_path):
    cfg, out = eqlv2_run
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(out, resumed_dir)
    saved = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                       weights_only=False)["model"]
    cfg = cfg.clone()
    cfg.OUTPUT_DIR = resumed_dir
    cfg.SOLVER.MAX_ITER = 4
    cfg.DATASETS.TEST = ()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    loss = trainer.model.roi_heads.box_predictor.cls_loss
    for k, buf in zip(STATS, (loss.pos_grad, loss.neg_grad)):
        assert torch.equal(buf, saved[k])
    trainer.train()
    # statistics only accumulate: the two new iterations add to the restored ones
    for k, buf in zip(STATS, (loss.pos_grad, loss.neg_grad)):
        assert torch.all(buf >= saved[k]) and buf.sum() > saved[k].sum()


def test_train_net_eval_only_cli(datasets, eqlv2_run):
    _, out = eqlv2_run
    env = {"EQL_D2_SYNTHETIC_ROOT": datasets}  # synthetic_lt_* names -> the same small data
    cfg_file = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml")
    args = ["--config-file", cfg_file, "--eval-only", *TINY_RCNN, *FEW_DETECTIONS,
            "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
            "OUTPUT_DIR", os.path.join(out, "cli_eval")]
    proc = run_train_net(args, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "cli_eval", "eval_metrics.json")) as f:
        metrics = json.load(f)["synthetic_lt_val"]
    assert set(metrics) == {"bbox"} and isinstance(metrics["bbox"]["APr"], float)
