"""tools/plot_gradients.py and demo.py."""

import csv
import json
import os

import pytest
import torch
from detectron2.data import MetadataCatalog

from eql_d2.config import get_eql_cfg
from eql_d2.utils.groups import GROUPS
from lvis_cases import per_category_case, write_json
from helpers import ROOT, load_script



def load(path, name):
    return load_script(path, name)


plot_gradients = load("tools/plot_gradients.py", "plot_gradients_tool")


def gradient_run(tmp_path, arch, loss_opts):
    """A run folder: config.yaml, a checkpoint with loss buffers, metrics.json."""
    from eql_d2.data.datasets import register_lvis_format

    gt, _, _, _ = per_category_case()  # 4 categories, train image counts 200, 30, 3, 1
    name = f"eqltest_grad_{tmp_path.name}"
    if name not in MetadataCatalog.list():
        register_lvis_format(name, write_json(tmp_path / "train.json", gt), str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    cfg = get_eql_cfg()
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", arch, "DATASETS.TRAIN", f"('{name}',)",
                         *loss_opts])
    (run / "config.yaml").write_text(cfg.dump())
    torch.save({"model": {"head.cls_score.weight": torch.zeros(4, 3),
                          "cls_loss.criterion.pos_grad": torch.tensor([2.0, 1.0, 0.0, 0.0]),
                          "cls_loss.criterion.neg_grad": torch.tensor([1.0, 4.0, 2.0, 0.0])},
                "iteration": 40}, run / "model_final.pth")
    kind = "efl" if arch == "ATSS" else "eqlv2"
    with open(run / "metrics.json", "w") as f:
        for it in (0, 20, 40):
            row = {"iteration": it, "total_loss": 1.0}
            row.update({f"{kind}/gradient_ratio/{g}": 0.1 * it / 40 + i
                        for i, g in enumerate(GROUPS)})
            f.write(json.dumps(row) + "\n")
    return run


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_efl_gradient_ratio_and_focusing_factor(tmp_path):
    run = gradient_run(tmp_path, "ATSS", ["MODEL.CLS_LOSS.NAME", "efl",
                                          "MODEL.CLS_LOSS.EFL.GAMMA_B", "2.0",
                                          "MODEL.CLS_LOSS.EFL.SCALE", "8.0"])
    written = plot_gradients.main(["--checkpoint", str(run / "model_final.pth")])
    rows = read_rows(run / "gradients" / "gradient_ratio_per_category.csv")
    assert [r["name"] for r in rows] == ["alpha", "beta", "gamma", "delta"]  # most images first
    # g = clamp(pos / neg, 0, 1), 1 without negative gradient; gamma = 2 + 8 (1 - g)
    assert [float(r["gradient_ratio"]) for r in rows] == [1.0, 0.25, 0.0, 1.0]
    assert [float(r["focusing_factor"]) for r in rows] == [2.0, 8.0, 10.0, 2.0]
    for png in ("gradient_ratio_per_category.png", "focusing_factor_per_category.png",
                "gradient_ratio_over_training.png"):
        assert str(run / "gradients" / png) in written
        assert (run / "gradients" / png).read_bytes()[:4] == b"\x89PNG"


def test_eqlv2_gradient_ratio_is_not_clamped(tmp_path):
    run = gradient_run(tmp_path, "GeneralizedRCNN", ["MODEL.CLS_LOSS.NAME", "eqlv2"])
    out = tmp_path / "plots"
    written = plot_gradients.main(["--checkpoint", str(run / "model_final.pth"),
                                   "--output-dir", str(out)])
    rows = read_rows(out / "gradient_ratio_per_category.csv")
    assert [r["gradient_ratio"] for r in rows] == ["2.0", "0.25", "0.0", ""]
    assert "focusing_factor" not in rows[0]
    assert str(out / "gradient_ratio_over_training.png") in written


def test_model_without_statistics_is_refused(tmp_path):
    run = gradient_run(tmp_path, "GeneralizedRCNN", ["MODEL.CLS_LOSS.NAME", "softmax"])
    with pytest.raises(ValueError, match="config.yaml: GeneralizedRCNN with "
                                         "MODEL.CLS_LOSS.NAME 'softmax'"):
        plot_gradients.main(["--checkpoint", str(run / "model_final.pth")])
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        plot_gradients.main(["--checkpoint", str(run / "missing.pth"),
                             "--config", str(run / "config.yaml")])


def test_demo_writes_visualizations(tmp_path, small_synthetic):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import eql_d2.modeling  # noqa: F401

    demo = load("demo.py", "demo_script")
    cfg = get_eql_cfg(os.path.join(ROOT, "configs", "Synthetic-LT", "atss_R18_FPN_focal.yaml"))
    cfg.merge_from_list(["DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
                         "MODEL.ATSS.NUM_CLASSES", "8", "INPUT.MIN_SIZE_TEST", "64",
                         "INPUT.MAX_SIZE_TEST", "64", "TEST.DETECTIONS_PER_IMAGE", "5"])
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    images = os.path.join(small_synthetic, "val")
    out = tmp_path / "vis"
    with pytest.raises(FileNotFoundError, match="Weights file not found: .*nope.pth"):
        demo.main(["--config-file", str(config), "--weights", str(tmp_path / "nope.pth"),
                   "--input", images, "--output", str(out)])
    assert not out.exists()
    first_two = sorted(os.listdir(images))[:2]
    written = demo.main(["--config-file", str(config), "--weights", str(tmp_path / "model.pth"),
                         "--input", *[os.path.join(images, n) for n in first_two],
                         "--output", str(out), "--confidence-threshold", "0.0"])
    assert sorted(os.listdir(out)) == sorted(first_two)
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in written)
