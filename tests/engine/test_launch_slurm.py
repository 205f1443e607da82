"""The submitit job (eql_d2.engine.slurm.TrainJob) on submitit's local executor: two tasks
form one job from submitit's environment; the pre-emption signal stops them at a checkpoint,
the job requeues itself with --resume and ends bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, TINY_RCNN, assert_same_final_model, free_port, last_checkpoint

submitit = pytest.importorskip("submitit")

from eql_d2.engine.slurm import TrainJob  # noqa: E402

CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml")
# 8 iterations of 2 x 1 image, a checkpoint every 2, no evaluation
SCHEDULE = [*TINY_RCNN, "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", "5",
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def test_preempted_job_requeues_and_ends_as_the_uninterrupted_run(small_synthetic, tmp_path,
                                                                   monkeypatch):
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the executor's tasks inherit this environment
    whole, preempted = str(tmp_path / "whole"), str(tmp_path / "preempted")

    executor = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="local")
    executor.update_parameters(tasks_per_node=2, timeout_min=30)
    job = executor.submit(TrainJob(os.path.join(ROOT, "train_net.py"),
                                   ["--config-file", CFG, *SCHEDULE, "OUTPUT_DIR", preempted],
                                   port=free_port()))
    # the uninterrupted run, meanwhile
    reference = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CFG, "--num-gpus",
         "2", "--dist-url", f"tcp://127.0.0.1:{free_port()}", *SCHEDULE, "OUTPUT_DIR", whole],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    deadline = time.time() + 300
    while last_checkpoint(preempted) is None and not job.done() and time.time() < deadline:
        time.sleep(0.05)
    assert not job.done(), job.stderr()
    tasks = _children(int(job.job_id))  # the local controller's pid is the job id
    assert len(tasks) == 2
    for pid in tasks:  # what Slurm does on pre-emption or before the time limit
        os.kill(pid, signal.SIGUSR2)
    job.wait()
    assert job.state == "FINISHED"
    err = reference.communicate(timeout=600)[1]
    assert reference.returncode == 0, err[-3000:]
    log = job.stdout() + job.stderr()
    assert "Requeued job" in log
    assert "--resume" not in " ".join(TrainJob("x", []).command_line())
    starts = [int(part.split()[0]) for part in log.split("Starting training from iteration ")[1:]]
    assert starts[0] == 0 and 2 <= starts[-1] < 8, starts
    assert os.path.isfile(os.path.join(preempted, f"model_{starts[-1] - 1:07d}.pth"))

    assert_same_final_model(whole, preempted)
