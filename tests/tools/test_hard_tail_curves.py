"""benchmarks/hard_tail_curves.py: the curves from metrics.json and the calibration table
(mean ± std over seeds, APr / APf, the last interval) of fabricated runs."""

import json
import os

from helpers import load_script

curves = load_script("benchmarks/hard_tail_curves.py")


def _run(root, arm, seed, evals, final, prefix="bbox/", regime=None):
    """A run folder: training rows every 20 iterations, evaluation rows at `evals`
    ({iteration: (AP, APr, APc, APf)}), final_metrics.json from `final`."""
    path = os.path.join(root, arm, f"seed{seed}")
    os.makedirs(path)
    rows = [{"iteration": it, "total_loss": 3.0 - it / 1000} for it in range(19, 1000, 20)]
    for it, values in evals.items():
        rows.append({"iteration": it, **{prefix + k: v for k, v in zip(curves.KEYS, values)}})
    with open(os.path.join(path, "metrics.json"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    if final is not None:
        with open(os.path.join(path, "final_metrics.json"), "w") as f:
            json.dump({"synthetic_hard_tail_val_fed": {"bbox": dict(zip(curves.KEYS, final))}}, f)
    if regime is not None:
        with open(os.path.join(path, "regime_indicators.jsonl"), "w") as f:
            for snap in regime:
                f.write(json.dumps(snap) + "\n")
    return path


def _snapshot(iteration, pos_grad, neg_grad, seen):
    return {"iteration": iteration, "class_frequency": ["r", "c", "f"],
            "heads": {"head": {"pos_grad": pos_grad, "neg_grad": neg_grad,
                               "pos_count": [seen] * 3, "neg_count": [10 * seen] * 3}}}


def test_eval_curve_takes_the_federated_val_and_sorts_by_iteration(tmp_path):
    path = _run(str(tmp_path), "a", 0, {539: (2, 1, 2, 3), 269: (1, 0, 1, 2)}, None,
                prefix="synthetic_hard_tail_val_fed/bbox/")
    rows = curves.read_json_lines(os.path.join(path, "metrics.json"))
    rows.append({"iteration": 539, "synthetic_hard_tail_val/bbox/AP": 99.0})
    assert curves.eval_curve(rows) == [(269, dict(zip(curves.KEYS, (1, 0, 1, 2)))),
                                       (539, dict(zip(curves.KEYS, (2, 1, 2, 3))))]
    loss = curves.loss_curve(rows)
    assert loss[0] == (19, 3.0 - 0.019) and len(loss) == 50
    # a running median over the last 100 iterations: 5 rows at 919..999
    assert loss[-1][1] == 3.0 - 0.959


def test_table_mean_std_ratio_last_interval_and_regime(tmp_path, capsys):
    root = str(tmp_path)
    _run(root, "atss_focal", 0, {100: (10, 2, 8, 20), 200: (12, 4, 10, 24)}, (12, 4, 10, 24),
         regime=[_snapshot(100, [1, 1, 1], [1, 1, 1], 5),
                 _snapshot(200, [2, 3, 5], [5, 3, 3], 9)])  # last interval: g = 0.25, 1, 2
    _run(root, "atss_focal", 1, {100: (11, 3, 9, 18), 200: (14, 6, 12, 20)}, (14, 6, 12, 20))
    _run(root, "atss_focal", 2, {100: (1, 1, 1, 1)}, None)  # unfinished: left out of the table
    runs = curves.find_runs(root)
    assert sorted(runs["atss_focal"]) == [0, 1, 2]
    text = curves.table(runs)
    row = next(line for line in text.splitlines() if line.startswith("| atss_focal"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:6] == ["atss_focal", "0,1", "13.00 ± 1.41", "5.00 ± 1.41", "11.00 ± 1.41",
                         "22.00 ± 2.83"]
    # APr / APf: 4 / 24 and 6 / 20
    assert cells[6] == "0.23 ± 0.09"
    assert cells[7] == "2.50 ± 0.71" and cells[8] == "2.50 ± 0.71"
    # regime indicators of seed 0 only: rare 1/4, common 2/2, frequent 4/2
    assert cells[9] == "0.25 / 1.00 / 2.00"
    png = str(tmp_path / "curves.png")
    curves.main([root, "--png", png, "--seeds", "0", "1"])
    assert os.path.getsize(png) > 10000
    assert "| atss_focal | 0,1 |" in capsys.readouterr().out


def test_two_schedules_are_named_by_folder_and_drawn_apart(tmp_path, capsys):
    short, long = str(tmp_path / "calib_12e"), str(tmp_path / "calib_24e")
    _run(short, "atss_focal", 0, {100: (10, 2, 8, 20)}, (10, 2, 8, 20))
    _run(long, "atss_focal", 0, {100: (10, 2, 8, 20), 200: (16, 6, 14, 28)}, (16, 6, 14, 28))
    _run(long, "frcnn_sigmoid", 0, {100: (20, 5, 20, 40)}, (20, 5, 20, 40))
    runs, styles = curves.find_runs_in([short, long])
    assert styles == {"atss_focal [calib_12e]": ("atss_focal", 0),
                      "atss_focal [calib_24e]": ("atss_focal", 1),
                      "frcnn_sigmoid [calib_24e]": ("frcnn_sigmoid", 1)}
    # one folder keeps the plain arm names
    assert list(curves.find_runs_in([long])[0]) == ["atss_focal", "frcnn_sigmoid"]
    png = str(tmp_path / "curves.png")
    curves.main([short, long, "--png", png])
    out = capsys.readouterr().out
    assert "| atss_focal [calib_12e] | 0 | 10.00 | 2.00 |" in out
    assert "| atss_focal [calib_24e] | 0 | 16.00 | 6.00 |" in out
    assert os.path.getsize(png) > 10000


def test_an_arm_folder_contributes_that_arm_named_by_its_parent(tmp_path, capsys):
    short, long = str(tmp_path / "calib_12e"), str(tmp_path / "calib_24e")
    _run(short, "atss_focal", 0, {100: (10, 2, 8, 20)}, (10, 2, 8, 20))
    _run(short, "atss_focal", 1, {100: (12, 2, 8, 20)}, (12, 2, 8, 20))
    _run(short, "frcnn_sigmoid", 0, {100: (1, 1, 1, 1)}, (1, 1, 1, 1))
    _run(long, "atss_focal", 0, {100: (2, 2, 2, 2)}, (2, 2, 2, 2))
    _run(long, "frcnn_sigmoid", 0, {100: (20, 5, 20, 40)}, (20, 5, 20, 40))
    arm_dirs = [os.path.join(short, "atss_focal"), os.path.join(long, "frcnn_sigmoid") + "/"]
    runs, styles = curves.find_runs_in(arm_dirs)
    assert styles == {"atss_focal [calib_12e]": ("atss_focal", 0),
                      "frcnn_sigmoid [calib_24e]": ("frcnn_sigmoid", 1)}
    assert sorted(runs["atss_focal [calib_12e]"]) == [0, 1]
    # --arms still filters: an arm folder of another arm gives nothing
    assert list(curves.find_runs_in(arm_dirs, arms=["frcnn_sigmoid"])[0]) == [
        "frcnn_sigmoid [calib_24e]"]
    curves.main(arm_dirs)
    out = capsys.readouterr().out
    assert "| atss_focal [calib_12e] | 0,1 | 11.00 ± 1.41 |" in out
    assert "| frcnn_sigmoid [calib_24e] | 0 | 20.00 | 5.00 |" in out
    assert "[calib_24e] | 0 | 2.00" not in out and "| 1.00 |" not in out


def test_regime_is_taken_over_the_last_evaluation_interval(tmp_path, capsys):
    # evaluations at 200 and 328; snapshots at 100, 200, 300, 328: the table's g spans the
    # snapshots 200 -> 328, not only the last 28 iterations (300 -> 328)
    root = str(tmp_path)
    snaps = [_snapshot(100, [1, 1, 1], [1, 1, 1], 5),
             _snapshot(200, [2, 2, 2], [2, 2, 2], 9),
             _snapshot(300, [6, 4, 3], [10, 4, 3], 12),
             _snapshot(328, [8, 8, 10], [12, 6, 6], 14)]
    path = _run(root, "frcnn_sigmoid", 0, {200: (10, 2, 8, 20), 328: (11, 3, 9, 21)},
                (11, 3, 9, 21), regime=snaps)
    # 200 -> 328: rare 6/10, common 6/4, frequent 8/4
    assert curves.regime_last_interval(path, 200) == {"r": 0.6, "c": 1.5, "f": 2.0}
    assert curves.regime_last_interval(path, 250) == {"r": 0.6, "c": 1.5, "f": 2.0}
    # before the first snapshot: the whole run
    assert curves.regime_last_interval(path, 50) == {"r": 8 / 12, "c": 8 / 6, "f": 10 / 6}
    assert curves.regime_last_interval(path) == {"r": 1.0, "c": 2.0, "f": 7 / 3}
    curves.main([root])
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| frcnn_sigmoid"))
    assert row.rstrip(" |").endswith("0.60 / 1.50 / 2.00")
