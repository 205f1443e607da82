"""Distributed training on CPU (gloo): two processes with half batches train the model one
process trains on the whole batch, and the two-command multi-machine form forms one job."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY_ONE_STAGE, TINY_RCNN, free_port, run_train_net

# Proposal and ROI sampling draw at random from each process's RNG, so one process and two
# would sample different proposals. Sampling every anchor and every proposal, with a fixed
# number of proposals per image and no ground-truth proposals appended, makes the sampled
# sets and every loss normalizer the same whichever process holds an image.
NO_SAMPLING = [
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "False",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "100000",
]
CASES = {
    "faster_rcnn_eqlv2": ("configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml",
                          TINY_RCNN + NO_SAMPLING),
    "atss_efl": ("configs/Synthetic-LT/atss_R18_FPN_efl.yaml", TINY_ONE_STAGE),
}
COMMON = ["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3", "SEED", "11",
          "TEST.EVAL_PERIOD", "0"]


def _url():
    # detectron2's default --dist-url port depends only on the user id, so two test runs
    # at once (or a training job) would collide on it
    return f"tcp://127.0.0.1:{free_port()}"


def _probe(out, rank, name):
    return torch.load(os.path.join(out, "probe", f"rank{rank}_{name}.pt"), weights_only=False)


def _train(case, out, env, extra=()):
    config, tiny = CASES[case]
    args = ["--config-file", os.path.join(ROOT, config), *extra, *tiny, *COMMON, "OUTPUT_DIR", out]
    proc = run_train_net(args, env, script="tests/engine/train_probe.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(small_synthetic, tmp_path_factory):
    """case -> (one-process output folder, two-process output folder)."""
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    done = {}
    for case in CASES:
        one = str(tmp_path_factory.mktemp(f"{case}_1p"))
        two = str(tmp_path_factory.mktemp(f"{case}_2p"))
        _train(case, one, env)
        _train(case, two, env, ["--num-gpus", "2", "--dist-url", _url()])
        done[case] = (one, two)
    return done, env


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_what_one_process_trains(runs, case):
    (one, two), _ = runs[0][case], runs[1]
    for it in range(3):
        single = _probe(one, 0, f"stats_iter{it}")
        r0, r1 = _probe(two, 0, f"stats_iter{it}"), _probe(two, 1, f"stats_iter{it}")
        assert single and set(single) == set(r0) == set(r1)
        for key, ref in single.items():
            assert ref.sum() > 0
            # summed over workers: the same buffers on every rank...
            assert torch.equal(r0[key], r1[key]), (it, key)
            # ...equal to one process's on the whole batch
            torch.testing.assert_close(r0[key], ref, rtol=1e-5, atol=1e-6 * float(ref.max()))
    final = [_probe(two, r, "final") for r in (0, 1)]
    assert [f["world_size"] for f in final] == [2, 2]
    assert [f["writes_checkpoints"] for f in final] == [True, False]
    p0, p1 = final[0]["params"], final[1]["params"]
    assert set(p0) == set(p1)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert os.path.isfile(os.path.join(two, "model_final.pth"))


def test_eval_only_same_with_one_and_two_processes(runs):
    _, two = runs[0]["faster_rcnn_eqlv2"]
    env = runs[1]
    config, tiny = CASES["faster_rcnn_eqlv2"]
    metrics = []
    for n in (1, 2):
        out = os.path.join(two, f"eval_{n}")
        proc = run_train_net(["--config-file", os.path.join(ROOT, config), "--eval-only",
                              "--num-gpus", str(n), "--dist-url", _url(), *tiny, *COMMON,
                              "OUTPUT_DIR", out,
                              "MODEL.WEIGHTS", os.path.join(two, "model_final.pth")], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(os.path.join(out, "eval_metrics.json")) as f:
            metrics.append(json.load(f))
    assert metrics[0] == metrics[1]
    assert "AP" in metrics[0]["synthetic_lt_val"]["bbox"]


def test_two_commands_form_one_multi_machine_job(small_synthetic, tmp_path):
    config, tiny = CASES["atss_efl"]
    url = _url()
    env = dict(os.environ, EQL_D2_SYNTHETIC_ROOT=small_synthetic, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file",
         os.path.join(ROOT, config), "--num-gpus", "1", "--num-machines", "2",
         "--machine-rank", str(rank), "--dist-url", url, *tiny, *COMMON,
         "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / f"machine{rank}")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    # one job of two processes: only global rank 0 writes the model
    assert os.path.isfile(tmp_path / "machine0" / "model_final.pth")
    assert not os.path.exists(tmp_path / "machine1" / "model_final.pth")
    assert "Rank of current process: 0. World size: 2" in outputs[0]
