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


def test_seeds_table_pairs_arms_by_seed(tmp_path):
    keys = cascade_diagnosis.KEYS
    values = {("s0", "sigmoid"): 50.0, ("s0", "eqlv2"): 47.0,
              ("s1", "sigmoid"): 40.0, ("s1", "eqlv2"): 45.0, ("s2", "sigmoid"): 30.0}
    for (seed, arm), v in values.items():
        (tmp_path / seed / arm).mkdir(parents=True)
        metrics = {"val": {"bbox": {k: v + i for i, k in enumerate(keys)}}}
        (tmp_path / seed / arm / "final_metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "s2" / "eqlv2").mkdir()  # cut off: no final_metrics.json, left out
    runs, lines = cascade_diagnosis.seeds_table(
        [str(tmp_path / s) for s in ("s0", "s1", "s2")])
    assert {arm: len(r) for arm, r in runs.items()} == {"eqlv2": 2, "sigmoid": 3}
    # sigmoid's AP over the three seeds: 40 ± 10; eqlv2 - sigmoid paired: -3 and +5 -> 1 ± 5.66
    assert "| sigmoid | 3 | 40.00 ± 10.00 |" in "\n".join(lines)
    assert "| eqlv2 | 2 | 1.00 ± 5.66 | 1.00 ± 5.66 |" in "\n".join(lines)
    with pytest.raises(SystemExit, match="no finished 'softmax' run"):
        cascade_diagnosis.seeds_table([str(tmp_path / "s0")], reference="softmax")
