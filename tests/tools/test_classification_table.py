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


def test_medium_classes_are_split_at_seqls_lambda(tmp_path, capsys):
    table = load_script("benchmarks/classification_table.py")
    # 4 classes, 100 train images: frequencies 0.6, 0.3, 0.07, 0.03; medium are 1-3
    counts = [60, 30, 7, 3]
    shots = ["many", "medium", "medium", "medium"]
    top1 = {"softmax": [90, 80, 70, 60], "seql": [91, 50, 75, 65]}
    for arm in ("softmax", "seql"):
        write_run(tmp_path, arm, 0, [0, 0, 0, 0, 0])
        csv_dir = tmp_path / arm / "seed0" / "inference" / "synthetic_cls_lt_test"
        csv_dir.mkdir(parents=True)
        rows = ["class,name,train_image_count,shot,test_images,top1,top5"] + [
            f"{c},c{c},{n},{shot},10,{acc},100" for c, (n, shot, acc)
            in enumerate(zip(counts, shots, top1[arm]))]
        (csv_dir / "per_class_accuracy.csv").write_text("\n".join(rows) + "\n")
    # lambda 0.1: classes 2 and 3 are SEQL's tail set, class 1 is above it
    (tmp_path / "seql" / "seed0" / "config.yaml").write_text(
        "MODEL:\n  CLS_LOSS:\n    SEQL:\n      LAMBDA: 0.1\n")
    assert table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("| arm | seed | medium under lambda (2 classes) | "
            "medium above lambda (1 classes) |") in out
    assert "| softmax | 0 | 65.00 | 80.00 |" in out
    assert "| seql | 0 | 70.00 | 50.00 |" in out
