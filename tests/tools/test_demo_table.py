"""tools/demo_table.py: the demo's table comes from the runs' own files and the reference."""

import json
import os

import pytest

from helpers import load_script


def load_tool():
    return load_script("tools/demo_table.py")


demo_table = load_tool()


def fake_run(root, name, loss, seed, ap, apr, apc, apf, plots=True, rare_aps=(0.0, 5.0, 1.0)):
    """A finished train_net.py OUTPUT_DIR: metrics, config, log and (optionally) plots."""
    d = root / name
    inference = d / "inference" / "synthetic_lt_val"
    inference.mkdir(parents=True)
    metrics = {"synthetic_lt_val": {"bbox": {"AP": ap, "AP50": ap + 10, "APr": apr,
                                             "APc": apc, "APf": apf}}}
    (d / "final_metrics.json").write_text(json.dumps(metrics))
    (d / "config.yaml").write_text(
        f"MODEL:\n  CLS_LOSS:\n    NAME: {loss}\nSEED: {seed}\nSOLVER:\n  MAX_ITER: 300\n")
    (d / "log.txt").write_text(
        "[12/04 10:00:00 detectron2]: Command line arguments: Namespace("
        f"config_file='configs/{loss}.yaml', resume=False)\n"
        "[12/04 10:04:30 d2.engine.hooks]: Total training time\n")
    if plots:
        (inference / "ap_vs_train_images_bbox.png").write_bytes(b"png")
        rows = [f"{i + 1},r{i},r,{i + 1},{a},10" for i, a in enumerate(rare_aps)]
        rows += ["9,f0,f,300,50.0,40", "10,c_no_val_objects,c,20,nan,0"]
        (inference / "per_category_bbox.csv").write_text(
            "category_id,name,frequency,train_image_count,AP,num_detections\n"
            + "\n".join(rows) + "\n")
    return str(d)


def test_reference_is_written_from_the_runs_and_printed_beside_this_run(tmp_path, capsys):
    s0 = fake_run(tmp_path, "sigmoid_seed0", "SigmoidCE", 0, 20.0, 4.0, 12.0, 40.0)
    s1 = fake_run(tmp_path, "sigmoid_seed1", "SigmoidCE", 1, 22.0, 6.0, 14.0, 42.0,
                  rare_aps=(0.0, 0.0, 1.0))
    ref = str(tmp_path / "ref.json")
    assert demo_table.main(["--write-reference", ref, "--command", "make demo-reference",
                            s0, s1]) == 0
    written = json.load(open(ref))
    assert written["command"] == "make demo-reference"
    assert [(r["loss"], r["seed"], r["max_iter"]) for r in written["runs"]] == [
        ("SigmoidCE", 0, 300), ("SigmoidCE", 1, 300)]
    assert written["runs"][0]["metrics"]["APr"] == 4.0
    assert written["runs"][0]["config_file"] == "configs/SigmoidCE.yaml"
    assert written["runs"][0]["wall_s"] == 270
    assert [r["rare_detected"] for r in written["runs"]] == [[2, 3], [1, 3]]
    capsys.readouterr()

    run = fake_run(tmp_path, "demo", "EQLv2", 0, 25.0, 10.0, 16.0, 41.0, rare_aps=(2.0, 5.0, 1.0))
    assert demo_table.main([run, "--reference", ref]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("EQLv2 (this run, seed 0)"))
    assert row.split()[-5:] == ["25.00", "10.00", "16.00", "41.00", "3/3"]
    mean = next(line for line in lines if line.startswith("SigmoidCE (reference mean of 2)"))
    assert mean.split()[-5:] == ["21.00", "5.00", "13.00", "41.00", "1.5/3"]
    diff = next(line for line in lines if line.startswith("EQLv2 (this run) - SigmoidCE"))
    assert diff.split()[-5:] == ["+4.00", "+5.00", "+3.00", "+0.00", "+1.5"]
    assert "measured with `make demo-reference`" in out
    assert "SigmoidCE: spread over the reference seeds (max - min): AP 2.00, APr 2.00" in out
    assert os.path.join(run, "inference", "synthetic_lt_val", "ap_vs_train_images_bbox.png") in out
    assert "not the same schedule" not in out


def test_runs_without_metrics_are_skipped_or_named(tmp_path, capsys):
    run = fake_run(tmp_path, "demo", "EQLv2", 0, 25.0, 10.0, 16.0, 41.0, plots=False)
    missing = str(tmp_path / "baseline_not_run")
    assert demo_table.main([run, missing, "--skip-missing",
                            "--reference", str(tmp_path / "no_reference.json")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("EQLv2 (this run, seed 0)"))
    assert row.split()[-1] == "-" and "per-category" not in out
    assert "no reference table at" in out
    with pytest.raises(FileNotFoundError, match="final_metrics.json"):
        demo_table.main([missing])


def test_old_layout_configs_name_their_loss():
    assert demo_table.loss_name({"MODEL": {"EQL": {"LOSS": "eqlv2"}}}) == "eqlv2"
    assert demo_table.loss_name({"MODEL": {"CLS_LOSS": {"NAME": "EQLv2"}}}) == "EQLv2"
