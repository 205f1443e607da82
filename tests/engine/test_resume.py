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

from helpers import (ROOT, TINY_RCNN, TINY_YOLOX, assert_same_final_model, last_checkpoint,
                     run_train_net)
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


# YOLOX as released (SimOTA, objectness) with EFL and its training recipe: Mosaic, MixUp,
# random affine and HSV jitter in the loader (one worker), EMA of the weights, YOLOX's
# schedule, and the last epochs without Mosaic and with the L1 loss starting after the
# resumed checkpoint (iteration 7 of 10)
YOLOX_CFG = os.path.join(ROOT, "configs/Synthetic-LT/yolox_tiny_sigmoid.yaml")
NO_AUG_START = 7
TINY_YOLOX_RECIPE = [
    *TINY_YOLOX, "MODEL.CLS_LOSS.NAME", "EFL", "SOLVER.WARMUP_ITERS", "2",
    # 10 iterations from scratch score below YOLOX's 0.01: compare detections all the same
    "MODEL.YOLOX.SCORE_THRESH_TEST", "0.0",
    "INPUT.MOSAIC.ENABLED", "True", "INPUT.MOSAIC.SIZE", "(64, 64)",
    "INPUT.MOSAIC.MIXUP.PROB", "0.5", "INPUT.HSV.ENABLED", "True",
    "MODEL_EMA.ENABLED", "True", "MODEL_EMA.RAMP_UPDATES", "2.0",
    "SOLVER.LR_SCHEDULER_NAME", "YOLOXWarmCosineLR", "SOLVER.WARMUP_FACTOR", "0.0",
    "DATALOADER.NUM_WORKERS", "1",
]


def _images_per_epoch(small_synthetic):
    """The repeat-factor epoch of the small Synthetic-LT at the config's threshold."""
    from detectron2.data import get_detection_dataset_dicts
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    from eql_d2.config import get_eql_cfg
    from helpers import register_small

    train, _ = register_small(small_synthetic, "resume_recipe")
    cfg = get_eql_cfg(YOLOX_CFG)
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.DATALOADER.REPEAT_ROUNDING == "stochastic"
    dicts = get_detection_dataset_dicts([train], filter_empty=True)
    return float(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
        dicts, cfg.DATALOADER.REPEAT_THRESHOLD).sum())


def _last_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if '"loss_cls"' in line][-1]


def test_yolox_recipe_run_killed_and_resumed_ends_bit_identical(small_synthetic, tmp_path):
    """The augmentation stream (extra mosaic and MixUp images drawn by repeat factor), the
    EMA, the schedule and the switch to plain images and the L1 loss at its computed
    iteration are the same in a run SIGKILLed after its checkpoint of iteration 3 and
    resumed as in the uninterrupted run; --eval-only from model_final evaluates its EMA
    weights and reproduces the final metrics."""
    from helpers import assert_eval_only_reproduces
    from eql_d2.solver import epoch_length

    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    per_epoch = epoch_length(_images_per_epoch(small_synthetic), 2)
    no_aug = ["INPUT.MOSAIC.NO_AUG_EPOCHS", repr((10 - NO_AUG_START) / per_epoch)]
    opts = [*TINY_YOLOX_RECIPE, *SCHEDULE, *no_aug]
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")

    def args(out):
        return ["--config-file", YOLOX_CFG, *opts, "OUTPUT_DIR", out]

    proc = run_train_net(args(whole), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    switch = f"Mosaic / MixUp off and the L1 box loss on from iteration {NO_AUG_START} of 10"
    assert switch in proc.stdout + proc.stderr

    _kill_after(args(resumed), resumed, env, "model_0000003.pth")
    proc = run_train_net(["--resume", *args(resumed)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    start = int(log.split("Starting training from iteration ")[1].split()[0])
    assert 4 <= start < NO_AUG_START and switch in log
    # the last iteration trained with the L1 loss, in both runs
    assert "loss_l1" in _last_metrics(whole) and "loss_l1" in _last_metrics(resumed)

    a, b = assert_same_final_model(whole, resumed)
    assert a["trainer"]["data_stream"] == b["trainer"]["data_stream"]
    assert a["model_ema"]["updates"] == b["model_ema"]["updates"] == 10
    ema_a, ema_b = a["model_ema"]["weights"], b["model_ema"]["weights"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert any(not torch.equal(ema_a[k], a["model"][k]) for k in ema_a)
    with open(os.path.join(whole, "final_metrics.json")) as f1, \
            open(os.path.join(resumed, "final_metrics.json")) as f2:
        final = json.load(f1)
        assert json.load(f2) == final
    assert_eval_only_reproduces(YOLOX_CFG, opts, whole, env, final)
