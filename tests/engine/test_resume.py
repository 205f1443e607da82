"""Exact resume: a run SIGKILLed after its second checkpoint and resumed with --resume ends
bit-identical to the run that was never interrupted (weights, loss statistics, optimizer
state, final metrics), with repeat factor sampling and data-loader workers too."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, TINY_RCNN, assert_same_final_model, last_checkpoint, run_train_net
from eql_d2.engine import AtomicCheckpointer

CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml")
# 10 iterations, a checkpoint every 2 (after iterations 1, 3, 5, 7, 9)
SCHEDULE = ["SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "5",
            "TEST.EVAL_PERIOD", "0"]
VARIANTS = {
    "training_sampler": [],
    # ceil rounding (the authors' expanded epoch); detectron2's stochastic rounding resumes
    # in tests/data/test_train_loader.py
    "rfs_ceil_two_workers": ["DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler",
                             "DATALOADER.REPEAT_THRESHOLD", "0.3",
                             "DATALOADER.REPEAT_ROUNDING", "ceil", "DATALOADER.NUM_WORKERS", "2"],
}


def _args(variant, out):
    return ["--config-file", CFG, *TINY_RCNN, *SCHEDULE, *VARIANTS[variant], "OUTPUT_DIR", out]


def _kill_after(args, out, env, checkpoint, timeout=600):
    """Run train_net.py and SIGKILL it as soon as `checkpoint` is the last checkpoint."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_net.py"), *args],
                            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while last_checkpoint(out) != checkpoint and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    return proc


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_killed_and_resumed_run_ends_bit_identical(variant, small_synthetic, tmp_path):
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    proc = run_train_net(_args(variant, whole), env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    _kill_after(_args(variant, resumed), resumed, env, "model_0000003.pth")
    assert not os.path.exists(os.path.join(resumed, "model_final.pth"))
    proc = run_train_net(["--resume", *_args(variant, resumed)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # it continued from the checkpoint (not from iteration 0)
    assert "Starting training from iteration" in proc.stdout + proc.stderr
    start = int((proc.stdout + proc.stderr).split("Starting training from iteration ")[1].split()[0])
    assert 4 <= start <= 9

    a, b = assert_same_final_model(whole, resumed)
    assert a["trainer"]["data_stream"] == b["trainer"]["data_stream"]
    with open(os.path.join(whole, "final_metrics.json")) as f1, \
            open(os.path.join(resumed, "final_metrics.json")) as f2:
        assert json.load(f1) == json.load(f2)


def test_a_checkpoint_cut_off_while_written_is_never_taken_for_one(tmp_path, monkeypatch):
    """What a save leaves when the process dies (a "<name>.pth.partial-<pid>" file) or fails
    (nothing) is never a checkpoint: resuming takes the last complete one."""
    checkpointer = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    checkpointer.save("model_0000001")
    complete = str(tmp_path / "model_0000001.pth")
    (tmp_path / "model_0000003.pth.partial-12345").write_bytes(b"cut off by SIGKILL")
    assert checkpointer.get_checkpoint_file() == complete
    assert checkpointer.get_all_checkpoint_files() == [complete]

    def fail(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000005")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth",
                                            "model_0000003.pth.partial-12345"]
    assert checkpointer.get_checkpoint_file() == complete
    monkeypatch.undo()
    assert set(torch.load(complete, weights_only=False)["model"]) == {"weight", "bias"}
