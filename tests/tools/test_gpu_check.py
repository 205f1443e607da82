"""benchmarks/gpu_check.py keeps working: its reduced CPU run, its inputs, its report."""

import json

import pytest
import torch
from helpers import load_script



# benchmarks/ is a folder of scripts: gpu_check imports its sibling bench_losses by name, as
# running it as a script allows, so the sibling is loaded (and registered) first
load_script("benchmarks/bench_losses.py", register=True)
gpu_check = load_script("benchmarks/gpu_check.py", register=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reduced_cpu_run_writes_every_row(tmp_path):
    result = gpu_check.main(["--out", str(tmp_path), "--device", "cpu"])
    with open(tmp_path / "gpu_check.json") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    md = (tmp_path / "gpu_check.md").read_text()

    # (a) both losses, fp32 and AMP, each implementation of the reduced set
    s = gpu_check.settings(cuda=False)
    got = {(r["loss"], r["precision"], r["impl"]) for r in result["losses"]}
    assert got == {(loss, prec, impl) for loss in ("efl", "eqlv2")
                   for prec in ("fp32", "AMP (bfloat16)") for impl in s["impls"]}
    for r in result["losses"]:
        assert r["median_s"] > 0 and r["n"] == s["n"] and r["classes"] == 1203
        assert (r["speedup_vs_reference"] == 1.0) == (r["impl"] == "reference")
        # against the copy floor of the logits: one read + one write of N x width elements
        width = 1204 if r["loss"] == "eqlv2" else 1203
        elt = 4 if r["precision"] == "fp32" else 2
        assert r["floor_s"] > 0 and r["x_floor"] == pytest.approx(r["median_s"] / r["floor_s"])
        assert r["effective_gb_s"] == pytest.approx(2 * s["n"] * width * elt / r["median_s"] / 1e9)

    # (b) four models, AMP off only on CPU, finite losses, ratios against their baselines
    rows = {r["model"]: r for r in result["training"]}
    assert set(rows) == set(gpu_check.MODELS)
    for name, r in rows.items():
        assert "error" not in r, r
        assert r["amp"] is False and r["s_per_iter"] > 0 and r["peak_gpu_mib"] is None
        assert "syncs_per_iter" not in r and "loss_syncs" not in r  # (c) needs CUDA
    for name, base in [("mask_rcnn_eqlv2", "mask_rcnn_sigmoid"), ("atss_efl", "atss_focal")]:
        assert rows[name]["time_ratio"] == pytest.approx(rows[name]["s_per_iter"] / rows[base]["s_per_iter"])
    assert any("sync" in n and "skipped" in n for n in result["notes"])
    for name in gpu_check.MODELS:
        assert f"| {name} (R18) | off |" in md
    assert result["elapsed_s"] > 0


def test_budget_skips_what_it_cannot_start_and_still_reports(tmp_path):
    result = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--budget-s", "0"])
    assert result["losses"] == [] and result["training"] == []
    note = next(n for n in result["notes"] if "--budget-s" in n)
    assert "loss efl fp32" in note and "training atss_efl AMP off" in note
    with open(tmp_path / "gpu_check.json") as f:
        assert json.load(f)["notes"] == result["notes"]


def test_loss_sync_check_replays_each_loss(monkeypatch):
    """The classification losses of one training step, replayed forward and backward with
    the debug mode set to "error" around them; a loss that synchronises is reported with
    the line it comes from."""
    from detectron2.utils.events import EventStorage

    from eql_d2.modeling.cls_losses.efl import EFL

    s = gpu_check.settings(cuda=False)
    gpu_check.register_train_metadata(s["classes"])
    cfg = gpu_check.build_cfg("atss_efl", s, False, "cpu")
    trainer = gpu_check._trainer(cfg, gpu_check.synthetic_batch(s, "cpu"))
    modes = []
    with EventStorage(0) as storage:
        checks = gpu_check.loss_sync_check(trainer, storage, 0, amp=False, debug_mode=modes.append)
    assert modes == ["error", "default"]
    assert list(checks) == ["cls_loss.criterion"]
    assert checks["cls_loss.criterion"] == {"loss": "EFL", "sync_free": True, "error": None,
                                            "where": None}
    assert "head_loss" not in vars(trainer.model.cls_loss.criterion)  # the recorder is gone

    original = EFL.head_loss

    def syncing(self, *args, **kwargs):
        if modes and modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EFL, "head_loss", syncing)
    modes.clear()
    with EventStorage(0) as storage:
        checks = gpu_check.loss_sync_check(trainer, storage, 1, amp=False, debug_mode=modes.append)
    c = checks["cls_loss.criterion"]
    assert not c["sync_free"] and c["error"] == "called a synchronizing CUDA operation"
    assert c["where"].startswith("tests/tools/test_gpu_check.py:")
    assert modes == ["error", "default"]


def test_synthetic_batch_is_a_valid_training_batch():
    s = dict(gpu_check.settings(cuda=True))  # the LVIS-scale inputs, built on CPU
    batch = gpu_check.synthetic_batch(s, "cpu")
    assert len(batch) == 2
    for x in batch:
        inst = x["instances"]
        assert x["image"].shape == (3, 800, 1333) and inst.image_size == (800, 1333)
        boxes = inst.gt_boxes.tensor
        assert len(inst) == s["objects"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 1333).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 800).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert ((inst.gt_classes >= 0) & (inst.gt_classes < gpu_check.LVIS_CLASSES)).all()
        # every polygon lies in its box; the image-level rows hold the image's positives
        for poly, box in zip(inst.gt_masks.polygons, boxes):
            pts = torch.as_tensor(poly[0]).view(-1, 2)
            assert (pts >= box[:2] - 1e-3).all() and (pts <= box[2:] + 1e-3).all()
        verified = inst.image_labels.verified_rows()
        assert verified.shape == (len(inst), gpu_check.LVIS_CLASSES)
        assert verified[0, inst.gt_classes].all()
        assert torch.equal(verified[0], verified[-1])


def test_markdown_reports_cuda_rows():
    """The report of a CUDA run (as its JSON would hold it) shows ratios, syncs and sites."""
    result = {
        "environment": {"device": "NVIDIA H100", "torch": "2.11.0", "cuda": "13.0",
                        "python": "3.12.3", "numpy": "2.5.2", "detectron2": "0.7.2"},
        "notes": ["a note"],
        "losses": [{"loss": "efl", "n": 100000, "classes": 1203, "precision": "AMP (float16)",
                    "impl": "fused-compiled", "median_s": 0.0123, "speedup_vs_reference": 9.5,
                    "peak_mib": 812.4, "floor_s": 0.000123, "x_floor": 100.0,
                    "effective_gb_s": 39.1}],
        "training": [{"model": "atss_efl", "depth": 50, "amp": True, "image": "800x1333",
                      "batch": 2, "classes": 1203, "s_per_iter": 0.2501, "peak_gpu_mib": 9001.2,
                      "time_ratio": 1.04, "memory_ratio": 1.01, "syncs_per_iter": 7,
                      "sync_sites": [["eql_d2/x.py:10", 5], ["detectron2/y.py:3", 2]],
                      "loss_syncs": {"cls_loss.criterion": {
                          "loss": "EFL", "sync_free": False, "where": "eql_d2/losses/efl.py:99",
                          "error": "called a synchronizing CUDA operation"}}}],
    }
    md = gpu_check.markdown(result)
    assert "Device: NVIDIA H100; torch 2.11.0 (CUDA 13.0), Python 3.12.3, numpy 2.5.2" in md
    assert "| efl | 100000 x 1203 | AMP (float16) | fused-compiled | 0.0123 | 9.5 | 812 | 100.0 | 39.1 |" in md
    assert "efl AMP (float16) 0.123 ms" in md
    assert "| atss_efl (R50) | on | 800x1333, 2, 1203 | 0.250 | 9001 | 1.04 | 1.01 | 7 | no |" in md
    assert "- atss_efl (AMP on): eql_d2/x.py:10 x5; detectron2/y.py:3 x2" in md
    assert ("- atss_efl: EFL at cls_loss.criterion: eql_d2/losses/efl.py:99: called a "
            "synchronizing CUDA operation") in md


def test_cuda_settings_use_this_trees_implementations():
    s = gpu_check.settings(cuda=True)
    assert s["impls"] == ["reference", "fused-eager", "fused-compiled"]
    assert s["amp"] == [True, False] and s["n"] == 100_000
