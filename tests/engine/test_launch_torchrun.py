"""train_net.py under torchrun: the processes form their group from torchrun's environment
(env://, no spawning) and train what ``--num-gpus 2`` trains."""

import os
import subprocess
import sys

import torch

from helpers import ROOT, TINY_RCNN, free_port, run_train_net

CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml")
# 3 iterations of 2 x 2 images, no evaluation
SCHEDULE = [*TINY_RCNN, "SOLVER.IMS_PER_BATCH", "4", "SEED", "11", "TEST.EVAL_PERIOD", "0",
            "DATASETS.TEST", "()"]


def _final(out):
    return torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                      weights_only=False)["model"]


def test_torchrun_trains_what_num_gpus_trains(small_synthetic, tmp_path):
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    spawned, torchrun = str(tmp_path / "spawned"), str(tmp_path / "torchrun")
    train_net = os.path.join(ROOT, "train_net.py")
    commands = {
        spawned: [sys.executable, train_net, "--config-file", CFG, "--num-gpus", "2",
                  "--dist-url", f"tcp://127.0.0.1:{free_port()}"],
        torchrun: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), train_net,
                   "--config-file", CFG],
    }
    procs = {out: subprocess.Popen([*command, *SCHEDULE, "OUTPUT_DIR", out], cwd=ROOT,
                                   env={**os.environ, **env}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
             for out, command in commands.items()}  # both at once
    logs = {out: proc.communicate(timeout=600)[0] for out, proc in procs.items()}
    for out, proc in procs.items():
        assert proc.returncode == 0, logs[out][-3000:]
    # without --num-gpus: the two processes are torchrun's
    assert "Rank of current process: 0. World size: 2" in logs[torchrun]

    a, b = _final(spawned), _final(torchrun)
    stats = [k for k in a if k.endswith(("pos_grad", "neg_grad"))]
    assert stats and all(a[k].sum() > 0 for k in stats)
    assert set(a) == set(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:10]


def test_num_gpus_with_torchrun_environment_is_refused(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = run_train_net(["--config-file", CFG, "--num-gpus", "2", "OUTPUT_DIR", str(tmp_path)],
                         env)
    assert proc.returncode != 0
    assert "leave these options out" in proc.stderr
