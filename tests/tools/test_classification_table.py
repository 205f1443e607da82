"""benchmarks/classification_table.py: mean ± std over seeds and SEQL - softmax paired by
seed, from the driver's final_metrics.json files."""

import json
import statistics

from helpers import load_script

KEYS = ("top1", "top5", "many", "medium", "few")


def write_run(out, arm, seed, values):
    d = out / arm / f"seed{seed}"
    d.mkdir(parents=True)
    metrics = dict(zip(KEYS, values), mean_class_top1=0.0)
    (d / "final_metrics.json").write_text(json.dumps(
        {"synthetic_cls_lt_test": {"classification": metrics}}))


def test_tables_give_means_stds_and_paired_differences(tmp_path, capsys):
    table = load_script("benchmarks/classification_table.py")
    softmax = {0: [40, 70, 60, 40, 10], 1: [42, 71, 61, 41, 12], 2: [41, 69, 59, 42, 14]}
    seql = {0: [43, 72, 58, 44, 20], 1: [41, 70, 60, 40, 11], 2: [44, 73, 57, 45, 22]}
    for seed in range(3):
        write_run(tmp_path, "softmax", seed, softmax[seed])
        write_run(tmp_path, "seql", seed, seql[seed])
    write_run(tmp_path, "sweep_gamma0.0", 0, softmax[0])
    write_run(tmp_path, "sweep_gamma0.9", 0, seql[0])
    (tmp_path / "seql" / "seed3").mkdir()  # a run not finished: left out
    assert table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    top1 = [seql[s][0] for s in range(3)]
    assert f"| seql | 3 | {statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f} |" in out
    for k in range(len(KEYS)):
        diffs = [seql[s][k] - softmax[s][k] for s in range(3)]
        positive = sum(d > 0 for d in diffs)
        assert (f"{statistics.mean(diffs):.2f} ± {statistics.stdev(diffs):.2f} "
                f"({positive}/3 seeds > 0)") in out
    assert "| sweep_gamma0.9 | 1 | 43.00 |" in out
    (tmp_path / "empty").mkdir()
    assert table.main([str(tmp_path / "empty")]) == 1
