"""Jobs that cannot train together are refused at start: processes with different configs
(naming the keys), and a rendezvous that some processes never reach (naming who came)."""

import os
import subprocess
import sys
import time

from helpers import ROOT, TINY_RCNN, free_port, run_train_net

CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml")


def test_machines_with_different_configs_are_refused_naming_the_key(small_synthetic, tmp_path):
    env = dict(os.environ, EQL_D2_SYNTHETIC_ROOT=small_synthetic, OMP_NUM_THREADS="1")
    url = f"tcp://127.0.0.1:{free_port()}"
    start = time.time()
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", CFG,
         "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url,
         "--dist-timeout", "120", *TINY_RCNN, "SOLVER.MAX_ITER", str(3 + rank),
         "OUTPUT_DIR", str(tmp_path / f"machine{rank}")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outputs[0][-2000:]
    for out in outputs:
        assert "resolved different configs" in out, out[-2000:]
        assert "SOLVER.MAX_ITER: rank 0 3, rank 1 4" in out, out[-2000:]
        assert "Starting training" not in out
    # refused before anything is trained or written
    assert not os.path.exists(tmp_path / "machine0" / "config.yaml")
    print(f"refused after {time.time() - start:.1f} s")


def test_rendezvous_timeout_names_the_ranks_that_came(tmp_path):
    port = free_port()
    proc = run_train_net(["--config-file", CFG, "--num-machines", "3", "--machine-rank", "0",
                          "--dist-url", f"tcp://127.0.0.1:{port}", "--dist-timeout", "2",
                          "OUTPUT_DIR", str(tmp_path)], {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 1
    assert (f"rank 0: 1 of 3 processes reached the rendezvous at 127.0.0.1:{port} within 2 s"
            in proc.stderr), proc.stderr[-2000:]
    assert "missing ranks 1, 2" in proc.stderr
