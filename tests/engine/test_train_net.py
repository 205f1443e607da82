"""End-to-end: train_net.py trains, evaluates with LVISEvaluator and re-evaluates exactly."""

import json
import os

import pytest

from helpers import ROOT, TINY_RCNN, run_train_net

CFG = os.path.join(ROOT, "configs/Synthetic-LT/mask_rcnn_R18_FPN_d2heads_softmax.yaml")


@pytest.fixture(scope="module")
def trained(small_synthetic, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic}
    proc = run_train_net(["--config-file", CFG, *TINY_RCNN, "OUTPUT_DIR", out], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, env, proc


def test_train_then_eval_writes_lvis_metrics(trained):
    out, _, proc = trained
    with open(os.path.join(out, "final_metrics.json")) as f:
        metrics = json.load(f)["synthetic_lt_val"]
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "APr", "APc", "APf"):
            assert isinstance(metrics[task][key], float)
    assert "[synthetic_lt_val bbox] AP " in proc.stdout
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert not [f for f in os.listdir(out) if ".partial" in f]


def test_eval_only_reproduces_final_metrics(trained):
    out, env, _ = trained
    proc = run_train_net(["--config-file", CFG, "--eval-only", *TINY_RCNN,
                          "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
                          "OUTPUT_DIR", os.path.join(out, "eval")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "final_metrics.json")) as f:
        final = json.load(f)
    with open(os.path.join(out, "eval", "eval_metrics.json")) as f:
        again = json.load(f)
    assert again == final


def test_missing_config_file_is_named(tmp_path):
    proc = run_train_net(["--config-file", str(tmp_path / "no_such.yaml")])
    assert proc.returncode != 0
    assert "Config file not found" in proc.stderr and "no_such.yaml" in proc.stderr


def test_num_classes_mismatch_is_named(small_synthetic, tmp_path):
    args = ["--config-file", CFG, *TINY_RCNN, "MODEL.ROI_HEADS.NUM_CLASSES", "5",
            "OUTPUT_DIR", str(tmp_path)]
    proc = run_train_net(args, {"EQL_D2_SYNTHETIC_ROOT": small_synthetic})
    assert proc.returncode != 0
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 5" in proc.stderr and "has 8 categories" in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "model_final.pth"))


def test_eval_only_without_weights_is_named(small_synthetic, tmp_path):
    args = ["--config-file", CFG, "--eval-only", *TINY_RCNN,
            "MODEL.WEIGHTS", str(tmp_path / "missing.pth"), "OUTPUT_DIR", str(tmp_path)]
    proc = run_train_net(args, {"EQL_D2_SYNTHETIC_ROOT": small_synthetic})
    assert proc.returncode != 0 and "missing.pth" in proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "eval_metrics.json"))
