"""Stopping on a signal: SIGTERM to the launcher of a two-process run stops both processes at
a checkpoint (exit status 75), leaves no process behind, and --resume finishes the run; a run
whose model_final.pth was cut off while written gets it on --resume."""

import os
import signal
import subprocess
import sys
import time

import torch

from helpers import ROOT, TINY_RCNN, free_port, run_train_net
from eql_d2.engine import EXIT_STOPPED

CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml")
NO_EVAL = ["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "SEED", "5"]


def _descendants(pid):
    """Ids of the processes below `pid` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found += kids
        todo += kids
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _log_has(out, text, name="log.txt"):
    try:
        with open(os.path.join(out, name)) as f:
            return text in f.read()
    except OSError:
        return False


def test_sigterm_to_launcher_stops_every_worker_at_a_checkpoint(small_synthetic, tmp_path):
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / "run")
    args = ["--config-file", CFG, "--num-gpus", "2", "--dist-url",
            f"tcp://127.0.0.1:{free_port()}", *TINY_RCNN, *NO_EVAL, "SOLVER.MAX_ITER", "8",
            "SOLVER.CHECKPOINT_PERIOD", "1000", "OUTPUT_DIR", out]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_net.py"), *args],
                            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # both processes in their training loop (a signal before it has its usual effect)
    while (not all(_log_has(out, "Starting training", name) for name in ("log.txt",
                                                                         "log.txt.rank1"))
           and proc.poll() is None and time.time() < deadline):
        time.sleep(0.1)
    time.sleep(0.5)
    workers = _descendants(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    deadline = time.time() + 10
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]
    assert _log_has(out, "SIGTERM received: stopping after iteration")
    with open(os.path.join(out, "last_checkpoint")) as f:
        stopped_at = f.read().strip()
    assert stopped_at.startswith("model_0") and not os.path.exists(
        os.path.join(out, "model_final.pth"))

    args[args.index("--dist-url") + 1] = f"tcp://127.0.0.1:{free_port()}"
    done = run_train_net(["--resume", *args], env)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    start = int(log.split("Starting training from iteration ")[1].split()[0])
    assert start == int(stopped_at[len("model_"):-len(".pth")]) + 1
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


WORKER = """
import os, multiprocessing, time
from eql_d2.engine.launch import set_parent_death_signal

def worker(parent):
    set_parent_death_signal(parent)
    time.sleep(600)

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=worker, args=(os.getpid(),))
    process.start()
    print(process.pid, flush=True)
    time.sleep(600)
"""


def test_worker_ends_when_its_launcher_is_killed(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(WORKER)
    launcher = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    worker = int(launcher.stdout.readline())
    time.sleep(1)  # killed before or after the worker arms its death signal: the same
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 120
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def test_final_checkpoint_cut_off_is_written_on_resume(small_synthetic, tmp_path):
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    args = ["--config-file", CFG, *TINY_RCNN, *NO_EVAL, "SOLVER.CHECKPOINT_PERIOD", "3",
            "OUTPUT_DIR", str(out)]
    proc = run_train_net(args, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = out / "model_final.pth"
    before = torch.load(final, map_location="cpu", weights_only=False)
    # what a kill while model_final.pth is written leaves: the checkpoint of the last
    # iteration, named in last_checkpoint, and the temporary file
    final.rename(out / f"model_final.pth.partial-{os.getpid()}")
    (out / "last_checkpoint").write_text("model_0000002.pth")

    proc = run_train_net(["--resume", *args], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 3" in proc.stdout + proc.stderr
    after = torch.load(final, map_location="cpu", weights_only=False)
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert after["iteration"] == before["iteration"] == 2
    assert after["trainer"]["iteration"] == 2
    assert set(after["model"]) == set(before["model"])
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
