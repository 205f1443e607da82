"""train_net.py trains and evaluates an image classifier (SEQL, Synthetic-CLS-LT) from one
command, and a run SIGKILLed after a checkpoint and resumed with --resume ends bit-identical
to the run that was never interrupted (weights, optimizer state, final metrics)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, last_checkpoint, run_train_net
from eql_d2.data.classification import SyntheticClsSpec, generate_synthetic_cls_lt

CFG = os.path.join(ROOT, "configs/Classification/synthetic_cls_lt_R32_seql.yaml")
# a CIFAR ResNet-8 on 6 classes; 10 iterations of 8 images, a checkpoint every 2; lambda 0.1
# makes the classes of 4 images or fewer (of 55) tail classes
TINY = ["MODEL.CIFAR_RESNET.DEPTH", "8", "MODEL.CLASSIFIER.NUM_CLASSES", "6",
        "MODEL.CLS_LOSS.SEQL.LAMBDA", "0.1", "MODEL.CLS_LOSS.SEQL.GAMMA", "0.9",
        "SOLVER.IMS_PER_BATCH", "8", "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(6, 8)",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "5",
        "DATALOADER.NUM_WORKERS", "1", "TEST.IMS_PER_BATCH", "16"]


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scls") / "synthetic_cls_lt")
    return generate_synthetic_cls_lt(out, SyntheticClsSpec(
        num_classes=6, max_images=24, imbalance_factor=12, test_per_class=3))


def test_killed_and_resumed_classification_run_ends_bit_identical(tiny_preset, tmp_path):
    env = {"EQL_D2_SYNTHETIC_CLS_LT_ROOT": tiny_preset, "OMP_NUM_THREADS": "1"}
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    args = ["--config-file", CFG, *TINY]

    def start(out, stdout):
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train_net.py"), *args,
                                 "OUTPUT_DIR", out], cwd=ROOT, env={**os.environ, **env},
                                stdout=stdout, stderr=subprocess.PIPE, text=True)

    # the uninterrupted run and the one to kill run side by side (start-up dominates)
    uninterrupted = start(whole, subprocess.PIPE)
    killed = start(resumed, subprocess.DEVNULL)
    deadline = time.time() + 300
    while (last_checkpoint(resumed) != "model_0000003.pth" and killed.poll() is None
           and time.time() < deadline):
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    err = killed.communicate()[1]
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    assert not os.path.exists(os.path.join(resumed, "model_final.pth"))
    out, err = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, err[-3000:]
    assert "[synthetic_cls_lt_test classification] top1" in out
    assert os.path.isfile(os.path.join(whole, "inference", "synthetic_cls_lt_test",
                                       "per_class_accuracy.csv"))

    proc = run_train_net(["--resume", *args, "OUTPUT_DIR", resumed], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    start = int(log.split("Starting training from iteration ")[1].split()[0])
    assert 4 <= start <= 9

    a, b = (torch.load(os.path.join(d, "model_final.pth"), map_location="cpu",
                       weights_only=False) for d in (whole, resumed))
    assert set(a["model"]) == set(b["model"])
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, differ
    # the run learned something: BN statistics and weights moved from their initial values
    assert a["model"]["backbone.stem.norm.running_mean"].abs().sum() > 0
    opt_a, opt_b = (c["trainer"]["_trainer"]["optimizer"]["state"] for c in (a, b))
    assert opt_a.keys() == opt_b.keys() and opt_a
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    assert a["trainer"]["data_stream"] == b["trainer"]["data_stream"]
    with open(os.path.join(whole, "final_metrics.json")) as f1, \
            open(os.path.join(resumed, "final_metrics.json")) as f2:
        assert json.load(f1) == json.load(f2)
