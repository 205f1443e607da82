"""The Synthetic-LVIS study driver: run claiming between drivers, kept results, and the paired
differences of its table."""

import gzip
import json
import os
import statistics
import subprocess
import sys

import pytest

from helpers import ROOT, load_script

study = load_script("benchmarks/synthetic_lvis_study.py")


def test_a_run_is_claimed_once_and_a_dead_drivers_lock_is_taken_over(tmp_path):
    lock = str(tmp_path / "arm" / "seed0.lock")
    assert study.claim(lock)
    assert not study.claim(lock)  # held by a live process (this one)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(lock, "pid"), "w") as f:
        f.write(str(dead.pid))
    assert study.claim(lock)
    with open(os.path.join(lock, "pid")) as f:
        assert int(f.read()) == os.getpid()


def test_kept_results_hold_metrics_config_and_compressed_indicators(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_metrics.json").write_text('{"v": {"bbox": {"AP": 1.0}}}')
    (run / "config.yaml").write_text("SEED: 0\n")
    (run / "regime_indicators.jsonl").write_text('{"iteration": 1}\n')
    per_category = run / "inference" / "v_fed" / "per_category_bbox.csv"
    per_category.parent.mkdir(parents=True)
    per_category.write_text("category_id,name,frequency,train_image_count,AP\n1,a,r,3,5.0\n")
    (run / "inference" / "empty").mkdir()  # an evaluation folder without the CSV
    dest = str(tmp_path / "kept" / "arm" / "seed0")
    study.save_results(str(run), dest)
    assert sorted(os.listdir(dest)) == ["config.yaml", "final_metrics.json",
                                        "per_category_bbox_v_fed.csv",
                                        "regime_indicators.jsonl.gz"]
    assert (open(os.path.join(dest, "per_category_bbox_v_fed.csv")).read()
            == per_category.read_text())
    with gzip.open(os.path.join(dest, "regime_indicators.jsonl.gz"), "rt") as f:
        assert f.read() == '{"iteration": 1}\n'
    assert not [p for p in os.listdir(os.path.dirname(dest)) if ".partial" in p]


def test_a_finished_runs_periodic_checkpoints_are_deleted_and_its_final_weights_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_0000269.pth", "model_0000539.pth", "model_final.pth"):
        (run / name).write_bytes(b"w" * 10)
    (run / "model_notes.txt").write_text("x")
    # not finished yet (no final_metrics.json): a resume needs its checkpoints
    (run / "last_checkpoint").write_text("model_0000539.pth")
    assert study.prune_checkpoints(str(run)) == 0 and len(os.listdir(run)) == 5
    (run / "final_metrics.json").write_text("{}")
    assert study.prune_checkpoints(str(run)) == 0  # last_checkpoint names a periodic one
    (run / "last_checkpoint").write_text("model_final.pth")
    assert study.prune_checkpoints(str(run)) == 20
    assert sorted(os.listdir(run)) == ["final_metrics.json", "last_checkpoint",
                                       "model_final.pth", "model_notes.txt"]


def _fake_results(root, arm, seed, ap, apr):
    path = os.path.join(root, arm, f"seed{seed}")
    os.makedirs(path)
    bbox = {"AP": ap, "APr": apr, "APc": 0.0, "APf": 0.0}
    with open(os.path.join(path, "final_metrics.json"), "w") as f:
        json.dump({"synthetic_lvis_val_fed": {"bbox": bbox}}, f)


def test_table_reports_paired_differences_per_seed_with_mean_and_std(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    focal = {0: (20.0, 1.0), 1: (22.0, 3.0), 2: (21.0, 2.0)}
    efl = {0: (21.0, 4.0), 1: (22.5, 2.0), 2: (24.0, 2.5)}
    for seed in focal:
        _fake_results(str(tmp_path), "atss_focal", seed, *focal[seed])
        _fake_results(str(tmp_path), "atss_efl", seed, *efl[seed])
    study.cmd_table(None)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| EFL - focal (ATSS)"))
    d_ap = [efl[s][0] - focal[s][0] for s in (0, 1, 2)]
    d_apr = [efl[s][1] - focal[s][1] for s in (0, 1, 2)]
    assert "+1.00 / +0.50 / +3.00" in row
    assert f"({statistics.mean(d_ap):.2f} ± {statistics.stdev(d_ap):.2f})" in row
    assert f"({statistics.mean(d_apr):.2f} ± {statistics.stdev(d_apr):.2f})" in row
    means = next(line for line in out.splitlines() if line.startswith("| atss_focal |"))
    assert f"{statistics.mean(v[0] for v in focal.values()):.2f} ± 1.00" in means
    # arms without results are left out, not shown as zeros
    assert "frcnn_eql" not in out


def _fake_per_category(root, arm, seed, aps, dataset="synthetic_lvis_val_fed"):
    """aps: {category_id: (group, AP)}; AP None is written as LVISEval's -1 (no ground truth)."""
    with open(os.path.join(root, arm, f"seed{seed}", f"per_category_bbox_{dataset}.csv"),
              "w") as f:
        f.write("category_id,name,frequency,train_image_count,AP,num_detections\n")
        for cat, (group, ap) in aps.items():
            f.write(f"{cat},c{cat},{group},1,{-1 if ap is None else ap},0\n")


def test_per_category_differences_are_paired_by_category_and_sign_tested(tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    # seed 0: rare categories 1, 2 higher, 3 lower; category 4 has no ground truth in EFL's
    # run (left out); seed 1: rare 1 tied, 2 higher. Frequent: one category, lower.
    runs = {("atss_efl", 0): {1: ("r", 10.0), 2: ("r", 5.0), 3: ("r", 1.0), 4: ("c", None),
                              5: ("f", 50.0)},
            ("atss_focal", 0): {1: ("r", 8.0), 2: ("r", 4.0), 3: ("r", 2.0), 4: ("c", 7.0),
                                5: ("f", 51.5)},
            ("atss_efl", 1): {1: ("r", 3.0), 2: ("r", 9.0)},
            ("atss_focal", 1): {1: ("r", 3.0), 2: ("r", 6.0)}}
    for (arm, seed), aps in runs.items():
        _fake_results(str(tmp_path), arm, seed, 20.0, 1.0)
        _fake_per_category(str(tmp_path), arm, seed, aps)
    study.cmd_table(None)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines()
               if line.startswith("| EFL - focal (ATSS) | 0,1 | ") and "p " in line)
    # rare: differences +2, +1, -1 (seed 0) and 0, +3 (seed 1): 3 of 5 higher, median +1;
    # sign test on the 4 untied: P(X >= 3 or X <= 1 | n=4, 1/2) = 2 * 5 / 16
    assert ("| 3 up, 1 down of 5, median +1.00, p 0.62 | - "
            "| 0 up, 1 down of 1, median -1.50, p 1 |") in row


def test_per_category_differences_refuse_runs_of_different_datasets():
    with pytest.raises(ValueError, match="category 1 is 'r' in one run and 'c'"):
        study.per_category_differences([({1: ("r", 1.0)}, {1: ("c", 2.0)})])


def test_training_seconds_count_each_iteration_once_across_a_resume():
    # rows every 20 iterations; cut off after iteration 59, resumed from its checkpoint at 39
    rows = [{"iteration": 19, "time": 1.0}, {"iteration": 39, "time": 2.0},
            {"iteration": 59, "time": 3.0}, {"iteration": 59, "bbox/AP": 1.0},
            {"iteration": 59, "time": 5.0}, {"iteration": 79, "time": 4.0}]
    assert study.training_seconds(rows) == 20 * 1.0 + 20 * 2.0 + 20 * 5.0 + 20 * 4.0


def test_table_reports_convergence_and_cost_from_the_kept_metrics(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    _fake_results(str(tmp_path), "atss_focal", 0, 20.0, 1.0)
    rows = [{"iteration": 99, "time": 18.0}, {"iteration": 199, "time": 36.0},
            {"iteration": 99, "bbox/AP": 19.0, "bbox/APr": 2.5, "bbox/APc": 0.0,
             "bbox/APf": 0.0},
            {"iteration": 199, "bbox/AP": 20.0, "bbox/APr": 1.0, "bbox/APc": 0.0,
             "bbox/APf": 0.0}]
    with gzip.open(tmp_path / "atss_focal" / "seed0" / "metrics.json.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    study.cmd_table(None)
    out = capsys.readouterr().out
    # 100 iterations at 18 s and 100 at 36 s: 5400 s
    assert "| atss_focal/seed0 | 199 | +1.00 | -1.50 | 1.50 |" in out
    assert "1 runs, 1.5 core-hours of training" in out


def test_table_regime_window_is_the_last_evaluation_interval(tmp_path, monkeypatch, capsys):
    """Runs that evaluate every TEST.EVAL_PERIOD iterations (the hard-tail configs: an epoch)
    report g over that last period; runs without periodic evaluation over the last snapshot
    interval."""
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))

    def snap(it, pos, neg):
        return {"iteration": it, "class_frequency": ["r", "c", "f"],
                "heads": {"h": {"pos_grad": pos, "neg_grad": neg, "pos_count": [it] * 3,
                                "neg_count": [it] * 3}}}

    snaps = [snap(100, [1, 1, 1], [1, 1, 1]), snap(200, [2, 2, 2], [2, 2, 2]),
             snap(300, [6, 4, 3], [10, 4, 3]), snap(328, [8, 8, 10], [12, 6, 6])]
    for arm, period in (("atss_focal", 128), ("atss_efl", 0)):
        _fake_results(str(tmp_path), arm, 0, 20.0, 1.0)
        path = os.path.join(str(tmp_path), arm, "seed0")
        with open(os.path.join(path, "config.yaml"), "w") as f:
            f.write(f"SEED: 0\nTEST:\n  EVAL_PERIOD: {period}\n")
        with open(os.path.join(path, "regime_indicators.jsonl"), "w") as f:
            f.write("".join(json.dumps(s) + "\n" for s in snaps))
    study.cmd_table(None)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| atss_focal/seed0", "| atss_efl/seed0"))}
    # whole run: 8/12, 8/6, 10/6; from 200 (328 - 128) on: 6/10, 6/4, 8/4; 300 on: 2/2, 4/2, 7/3
    assert rows["atss_focal/seed0"][4:7] == ["0.6 (1/1)", "1.5 (0/1)", "2 (0/1)"]
    assert rows["atss_efl/seed0"][4:7] == ["1 (0/1)", "2 (0/1)", "2.33 (0/1)"]
    assert rows["atss_efl/seed0"][1:4] == rows["atss_focal/seed0"][1:4] == [
        "0.667 (1/1)", "1.33 (0/1)", "1.67 (0/1)"]


@pytest.mark.parametrize("arm", sorted(study.ARMS))
def test_every_arm_names_a_shipped_config(arm):
    config, _, kind = study.ARMS[arm]
    assert os.path.isfile(os.path.join(ROOT, config)) and kind in ("lvis", "balanced", "slt")


@pytest.mark.parametrize("arm", sorted(study.HARD_TAIL_ARMS))
def test_every_hard_tail_arm_names_a_hard_tail_config(arm):
    config, _, kind = study.HARD_TAIL_ARMS[arm]
    assert config.startswith("configs/Synthetic-HardTail/") and kind == "hard_tail"
    assert os.path.isfile(os.path.join(ROOT, config))


def test_hard_tail_order_covers_every_arm_and_seed_once_claims_first_baselines_last():
    runs = study.HARD_TAIL_RUNS
    assert sorted(runs) == sorted((a, s) for a in study.HARD_TAIL_ARMS for s in study.SEEDS)
    baselines = [i for i, (a, _) in enumerate(runs) if a in study.HARD_TAIL_BASELINES]
    assert baselines == list(range(len(runs) - len(baselines), len(runs)))
    # the three claims over all seeds come first
    claims = len(study.HARD_TAIL_CLAIMS) * len(study.SEEDS)
    assert sorted(runs[:claims]) == sorted((a, s) for a in study.HARD_TAIL_CLAIMS
                                           for s in study.SEEDS)
    # then the two-stage claims without repeat factor sampling, which train uniformly
    no_rfs = len(study.HARD_TAIL_NO_RFS) * len(study.SEEDS)
    assert {a for a, _ in runs[claims:claims + no_rfs]} == set(study.HARD_TAIL_NO_RFS)
    for arm in study.HARD_TAIL_NO_RFS:
        config, extra, _ = study.HARD_TAIL_ARMS[arm]
        assert extra == ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"]
        assert config == study.HARD_TAIL_ARMS[arm.replace("_no_rfs", "")][0]
    for _, arm, ref in study.HARD_TAIL_COMPARISONS:
        assert arm in study.HARD_TAIL_ARMS and ref in study.HARD_TAIL_ARMS
    # a seed's decoupled second stages follow their first stage directly
    for seed in study.SEEDS:
        first = runs.index(("frcnn_softmax", seed))
        assert {a for a, _ in runs[first + 1:first + 1 + len(study.FIRST_STAGES)]} == set(
            study.FIRST_STAGES)
        assert {s for _, s in runs[first + 1:first + 1 + len(study.FIRST_STAGES)]} == {seed}


def test_a_run_finished_in_the_run_folder_is_kept_without_training(tmp_path, monkeypatch,
                                                                    capsys):
    # a baseline the calibration driver finished: its results are copied, nothing is trained
    monkeypatch.setattr(study, "HARD_TAIL_RESULTS", str(tmp_path / "kept"))
    run = tmp_path / "out" / "atss_focal" / "seed1"
    run.mkdir(parents=True)
    (run / "final_metrics.json").write_text('{"v": {"bbox": {"AP": 1.0}}}')
    (run / "config.yaml").write_text("SEED: 1\n")
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: pytest.fail("trained"))
    args = study.argparse.Namespace(study="hard_tail", out=str(tmp_path / "out"),
                                    arms=["atss_focal"], seeds=[1], max_runs=0, opts=[])
    study.cmd_run(args)
    assert sorted(os.listdir(tmp_path / "kept" / "atss_focal" / "seed1")) == [
        "config.yaml", "final_metrics.json"]
    assert "results kept" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # now nothing is left to take
        study.cmd_run(args)
    assert stop.value.code == 3
    args.arms = ["balanced_atss_focal"]
    with pytest.raises(SystemExit, match="not arms of the hard_tail study"):
        study.cmd_run(args)


def test_empty_groups_are_not_averaged_or_differenced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path))
    # the balanced preset has no rare or frequent categories: LVISEval's -1 (x100)
    _fake_results(str(tmp_path), "balanced_atss_focal", 0, 60.0, -100.0)
    _fake_results(str(tmp_path), "balanced_atss_efl", 0, 61.5, -100.0)
    study.cmd_table(None)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| balanced: EFL - focal"))
    assert row.split("|")[3:5] == [" +1.50 ", " n/a "]
    means = next(line for line in out.splitlines() if line.startswith("| balanced_atss_efl |"))
    assert means.split("|")[3:5] == [" 61.50 ", " n/a "]


@pytest.mark.parametrize("name,configs", [("synthetic_lvis", "configs/Synthetic-LVIS/"),
                                          ("hard_tail", "configs/Synthetic-HardTail/")])
def test_a_second_stage_waits_for_its_first_stage_and_starts_from_its_weights(
        name, configs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "RESULTS", str(tmp_path / "kept"))
    monkeypatch.setattr(study, "HARD_TAIL_RESULTS", str(tmp_path / "kept"))
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)  # a failed run keeps nothing

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    monkeypatch.setattr(study, "generate_data", lambda *a: None)
    out = tmp_path / "out"
    args = study.argparse.Namespace(study=name, out=str(out), arms=["frcnn_crt"],
                                    seeds=[2], max_runs=0, opts=[], datasets=str(tmp_path))
    study.cmd_run(args)  # no first stage yet: nothing trained, no exit 3 (come back later)
    assert calls == [] and "waiting for first stages: frcnn_crt/seed2" in capsys.readouterr().out
    weights = out / "frcnn_softmax" / "seed2" / "model_final.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    study.cmd_run(args)
    (cmd,) = calls
    assert cmd[cmd.index("MODEL.WEIGHTS") + 1] == str(weights)
    assert cmd[cmd.index("--config-file") + 1] == (
        configs + "Decoupled/faster_rcnn_R18_FPN_softmax_crt.yaml")
    # every second stage's first stage is an arm that runs before it, in every seed
    runs = study.Study(name).runs
    for arm, first in study.FIRST_STAGES.items():
        for seed in study.SEEDS:
            assert runs.index((first, seed)) < runs.index((arm, seed))


def test_a_kept_first_stage_without_its_checkpoint_is_trained_again_before_its_second_stage(
        tmp_path, monkeypatch, capsys):
    # kept results hold no weights: on a new machine the second stage needs its first stage again
    monkeypatch.setattr(study, "RESULTS", str(tmp_path / "kept"))
    monkeypatch.setattr(study, "generate_data", lambda *a: None)
    kept = tmp_path / "kept" / "frcnn_softmax" / "seed1"
    kept.mkdir(parents=True)
    (kept / "final_metrics.json").write_text('{"v": {"bbox": {"AP": 2.0}}}')
    (kept / "config.yaml").write_text("SEED: 1\n")
    out = tmp_path / "out"
    calls = []

    def fake_run(cmd, **kwargs):  # a run that reproduces the kept metrics
        calls.append(cmd)
        run_dir = cmd[cmd.index("OUTPUT_DIR") + 1]
        for name, text in (("final_metrics.json", '{"v": {"bbox": {"AP": 2.0}}}'),
                           ("config.yaml", "SEED: 1\n"), ("model_final.pth", "")):
            with open(os.path.join(run_dir, name), "w") as f:
                f.write(text)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(study.subprocess, "run", fake_run)
    args = study.argparse.Namespace(study="synthetic_lvis", out=str(out),
                                    arms=["frcnn_crt", "frcnn_lws"], seeds=[1], max_runs=1,
                                    opts=[], datasets=str(tmp_path))
    assert study._runs_to_take(study.Study("synthetic_lvis"), str(out), [
        ("frcnn_crt", 1), ("frcnn_lws", 1)]) == [
        ("frcnn_softmax", 1), ("frcnn_crt", 1), ("frcnn_lws", 1)]
    study.cmd_run(args)
    (cmd,) = calls
    assert cmd[cmd.index("--config-file") + 1].endswith("EQL/faster_rcnn_R18_FPN_softmax.yaml")
    assert "metrics equal the kept ones" in capsys.readouterr().out
    study.cmd_run(args)  # now its checkpoint is there: the second stage starts from it
    assert calls[1][calls[1].index("MODEL.WEIGHTS") + 1] == str(
        out / "frcnn_softmax" / "seed1" / "model_final.pth")
