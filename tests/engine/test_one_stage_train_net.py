"""End-to-end: train_net.py trains ATSS and EFLRetinaNet with EFL, saves the statistics,
and --eval-only reproduces the final metrics."""

import json
import os

import pytest
import torch

from helpers import ROOT, TINY_ONE_STAGE, run_train_net


@pytest.mark.parametrize("config", ["atss_R18_FPN_efl.yaml", "retinanet_R18_FPN_efl.yaml"])
def test_train_then_eval_only(config, small_synthetic, tmp_path):
    cfg = os.path.join(ROOT, "configs/Synthetic-LT", config)
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic}
    out = str(tmp_path)
    proc = run_train_net(["--config-file", cfg, *TINY_ONE_STAGE, "OUTPUT_DIR", out], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(os.path.join(out, "final_metrics.json")) as f:
        final = json.load(f)
    for key in ("AP", "APr", "APc", "APf"):
        assert isinstance(final["synthetic_lt_val"]["bbox"][key], float)
    # the statistics are in the checkpoint, and their group means reach metrics.json
    state = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                       weights_only=False)["model"]
    assert state["cls_loss.criterion.neg_grad"].sum() > 0
    with open(os.path.join(out, "metrics.json")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    iters = [row for row in logged if "efl/gradient_ratio/f" in row]
    assert iters and all("efl/focusing_factor/r" in row for row in iters)

    proc = run_train_net(["--config-file", cfg, "--eval-only", *TINY_ONE_STAGE,
                          "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
                          "OUTPUT_DIR", os.path.join(out, "eval")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "eval", "eval_metrics.json")) as f:
        assert json.load(f) == final
