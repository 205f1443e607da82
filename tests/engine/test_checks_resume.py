"""--resume of train_net.py: another classification loss is refused and leaves the run's
config.yaml as it was; a regime_indicators.jsonl whose last line was cut is repaired."""

import json
import os
import shutil

import pytest

from helpers import ROOT, TINY_RCNN, run_train_net

EQLV2 = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml")
SIGMOID = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_sigmoid.yaml")
REGIME = ["MODEL.CLS_LOSS.REGIME_INDICATORS", "True", "MODEL.CLS_LOSS.LOG_PERIOD", "1",
          "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]


def _train(config, out, env, *extra, resume=False):
    return run_train_net(["--config-file", config, *(["--resume"] if resume else []),
                          *TINY_RCNN, *REGIME, *extra, "OUTPUT_DIR", out], env)


@pytest.fixture(scope="module")
def run(small_synthetic, tmp_path_factory):
    """A 3-iteration EQLv2 run with regime indicators written every iteration."""
    out = str(tmp_path_factory.mktemp("resume") / "run")
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    proc = _train(EQLV2, out, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, env


def _copy(run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    return out


def test_resume_with_another_loss_is_refused_and_keeps_config(run, tmp_path):
    out = _copy(run[0], tmp_path)
    with open(os.path.join(out, "config.yaml"), "rb") as f:
        config = f.read()
    proc = _train(SIGMOID, out, run[1], "SOLVER.MAX_ITER", "4", resume=True)
    assert proc.returncode != 0
    assert "model_final.pth was trained with the classification loss EQLv2" in proc.stderr
    assert "builds SigmoidCE" in proc.stderr
    with open(os.path.join(out, "config.yaml"), "rb") as f:
        assert f.read() == config


def test_cut_last_line_of_regime_indicators_is_dropped_on_resume(run, tmp_path):
    out = _copy(run[0], tmp_path)
    path = os.path.join(out, "regime_indicators.jsonl")
    with open(path) as f:
        text = f.read()
    assert [json.loads(line)["iteration"] for line in text.splitlines()] == [1, 2, 3]
    with open(path, "w") as f:
        f.write(text[:-30])  # a run killed while appending its record of iteration 3
    proc = _train(EQLV2, out, run[1], "SOLVER.MAX_ITER", "4", resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{path}: dropping its last line 3, which is incomplete" in proc.stdout + proc.stderr
    with open(path) as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2, 4]
