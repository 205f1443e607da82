"""benchmarks/cascade_diagnosis.py: per-stage training statistics from a metrics.json."""

import json

import pytest

from helpers import load_script

cascade_diagnosis = load_script("benchmarks/cascade_diagnosis.py")


def test_training_statistics_average_the_last_rows_per_stage(tmp_path):
    rows = []
    for it in range(4):
        rows.append({"iteration": it, "roi_head/num_fg_samples": 10.0 + it,
                     "roi_head/num_bg_samples": 30.0 - it,
                     "stage0/fast_rcnn/fg_cls_accuracy": 0.1 * it,
                     "stage2/roi_head/num_fg_samples": 20.0, "stage2/roi_head/num_bg_samples": 20.0,
                     "stage2/eqlv2/gradient_ratio/r": 0.5 + it})
    rows.append({"iteration": 5, "lr": 0.01})  # a row without the statistics
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = cascade_diagnosis.training_statistics(str(tmp_path), last=2)
    # last two rows that log each value: iterations 2 and 3
    assert s["stage1"]["fg accuracy"] == pytest.approx(0.25)
    assert s["stage1"]["fg share"] == pytest.approx((12 / 40 + 13 / 40) / 2)
    assert s["stage3"]["fg share"] == pytest.approx(0.5)
    assert s["stage3"]["ratio r"] == pytest.approx(3.0)
    assert "ratio r" not in s["stage1"] and s["stage2"] == {}
