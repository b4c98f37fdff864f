"""report.py rebuilds its tables from the result JSONs: every number in the main table equals
the value in the file it names, and missing runs show as "not run" with their command."""
import hashlib
import json
import sys

import pytest

import report
from utils import run_cli


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def fake_eval(miou, params, ms, classes=("background", "aeroplane", "bicycle")):
    return {"miou": miou, "params": params, "ms_per_image": ms, "fps": 1000 / ms,
            "per_class_iou": {c: (None if i == 2 else miou + 0.01 * i) for i, c in enumerate(classes)},
            "per_image_miou": [miou], "per_image_gt_classes": [2], "device": "cpu",
            "hardware": "CPU (test, 2 threads)", "checkpoint": "models/x_best.pth"}


def parse_main_table(markdown):
    lines = markdown.splitlines()
    start = lines.index("| " + " | ".join(report.MAIN_HEADER) + " |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def run_report(tmp_path, source="auto"):
    args = report.get_args_parser().parse_args([
        "--outputs", str(tmp_path / "outputs"), "--plots", str(tmp_path / "plots"),
        "--out", str(tmp_path / "report"), "--source", source])
    result = report.main(args)
    return result, (tmp_path / "report" / "README.md").read_text()


def test_voc_table_numbers_come_from_their_json(tmp_path):
    outputs = tmp_path / "outputs"
    evals = {"teacher": fake_eval(0.6742, 35322218, 412.3456),
             "no_kd": fake_eval(0.55317, 1298981, 12.3449),
             "response_kd": fake_eval(0.577049, 1298981, 13.0)}
    for method, data in evals.items():
        write(outputs / f"{method}_eval.json", data)
    write(outputs / "no_kd" / "summary.json", {"train_seconds_total": 3421.7})
    write(outputs / "demo" / "no_kd_eval.json", fake_eval(0.1, 1, 1.0))  # must be ignored
    result, markdown = run_report(tmp_path)
    assert result["source"] == "voc"
    rows = parse_main_table(markdown)
    labels = dict(report.METHODS)
    for method, data in evals.items():
        cells = rows[labels[method]]
        assert float(cells[1]) == round(100 * data["miou"], 2)
        assert int(cells[2].replace(",", "")) == data["params"]
        assert float(cells[3]) == round(data["ms_per_image"], 2)
        assert float(cells[4]) == round(data["fps"], 1)
        assert cells[6] == f"`{outputs / f'{method}_eval.json'}`"
    assert float(rows[labels["no_kd"]][5]) == round(3421.7 / 60, 1)
    assert rows[labels["response_kd"]][5] == "not recorded"
    for method in ("feature_kd", "combined_kd"):  # not run: the command from test.txt
        cells = rows[labels[method]]
        assert cells[1] == "not run"
        assert cells[6].startswith("`python evaluate.py") and f"outputs/{method}_eval.json" in cells[6]
    assert (tmp_path / "report" / "per_class_iou.png").is_file()
    assert "not run: `python benchmark.py" in markdown and "not run: `python compress.py" in markdown


def test_demo_source_reads_the_runs_its_results_name(tmp_path):
    outputs = tmp_path / "outputs"
    rows = []
    for i, method in enumerate(("teacher", "no_kd", "response_kd", "feature_kd", "combined_kd")):
        paths = [outputs / "demo" / f"run{i}_seed{s}_eval.json" for s in (0, 1)]
        for s, path in enumerate(paths):
            write(path, fake_eval(0.5 + 0.01 * i + 0.001 * s, 1298981, 10.0))
        rows.append({"method": method, "runs": [f"run{i}_seed0", f"run{i}_seed1"],
                     "evaluations": [str(p) for p in paths], "train_seconds": 60.0 * (i + 1),
                     "n": 2})
    write(outputs / "at_kd_eval.json", fake_eval(0.9, 1, 1.0))  # a VOC run: not in a demo report
    write(outputs / "demo_results.json", {"rows": rows, "reported_split": "val",
                                          "table_markdown": "| no_kd | 51.00 ± 0.07 | 2 |"})
    (tmp_path / "plots").mkdir()
    for kind in ("loss", "miou"):
        (tmp_path / "plots" / f"run1_seed0_{kind}.png").write_bytes(b"png")
    result, markdown = run_report(tmp_path, source="demo")
    assert result["source"] == "demo"
    table = parse_main_table(markdown)
    assert set(table) == {label for _, label in report.METHODS}
    assert table["Without KD"][1] == report.fmt_miou(0.51)  # the first seed's evaluation
    assert float(table["Without KD"][5]) == round(120.0 / 60, 1)
    assert "| no_kd | 51.00 ± 0.07 | 2 |" in markdown  # every seed: the demo's own table
    assert (tmp_path / "report" / "plots" / "run1_seed0_loss.png").is_file()


def test_sweep_tables_come_from_their_files(tmp_path):
    write(tmp_path / "outputs" / "benchmark.json", {"hardware": "CPU (test)", "device": "cpu",
                                                    "size": 520, "table_markdown": "| m |"})
    write(tmp_path / "outputs" / "sweep" / "tau" / "sweep.json", {
        "command": "python sweep.py --name tau --tau 1 2", "split": "select",
        "table_markdown": "| --tau | mIoU |\n|---|---|\n| 2 | 61.00 ± 1.00 |"})
    _, markdown = run_report(tmp_path, source="voc")
    assert "## Sweeps (sweep.py)" in markdown
    assert "written by `python sweep.py --name tau --tau 1 2`; final checkpoints scored on 'select'" in markdown
    assert "| 2 | 61.00 ± 1.00 |" in markdown
    # the result file travels with the report, so the table's evidence stays in the repo
    saved = tmp_path / "report" / "sweeps" / "tau.json"
    assert json.loads(saved.read_text())["command"] == "python sweep.py --name tau --tau 1 2"
    assert "(sweeps/tau.json)" in markdown


def test_missing_runs_show_as_not_run_with_their_command(tmp_path):
    write(tmp_path / "outputs" / "benchmark.json", {"hardware": "CPU (test)", "device": "cpu",
                                                    "size": 520, "table_markdown": "| m |"})
    _, markdown = run_report(tmp_path, source="voc")
    rows = parse_main_table(markdown)
    assert len(rows) == len(report.METHODS)
    assert all(cells[1] == "not run" for cells in rows.values())
    assert "`python test_teacher.py" in rows["Teacher"][6]


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_no_results_leave_the_old_report_untouched(tmp_path, monkeypatch, capsys):
    """A fresh clone has no outputs/: the committed report must survive `python report.py`."""
    old = tmp_path / "report"
    (old / "gallery" / "teacher").mkdir(parents=True)
    (old / "README.md").write_text("# an earlier report\n")
    (old / "gallery" / "teacher" / "success_0.png").write_bytes(b"png")
    before = snapshot(old)
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["report.py", "--outputs", "outputs", "--plots", "plots",
                                      "--out", "report"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # as `python report.py` exits
        run_cli(report.main, report.get_args_parser())
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no result files to report in outputs")
    assert "report is left as it was" in lines[0]
    assert snapshot(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "report"]  # no leftovers


def test_a_new_report_replaces_the_old_one_whole(tmp_path):
    old = tmp_path / "report"
    old.mkdir()
    (old / "stale.png").write_bytes(b"png")
    write(tmp_path / "outputs" / "no_kd_eval.json", fake_eval(0.5, 1298981, 10.0))
    run_report(tmp_path, source="voc")
    assert not (old / "stale.png").exists() and (old / "README.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "report"]


def test_throughput_tables_come_from_their_file_with_the_command(tmp_path):
    write(tmp_path / "outputs" / "benchmark.json", {"hardware": "CPU (test)", "device": "cpu",
                                                    "size": 520, "table_markdown": "| m |"})
    _, markdown = run_report(tmp_path, source="voc")
    assert "not run: `python benchmark.py --throughput`" in markdown
    write(tmp_path / "outputs" / "benchmark_throughput.json", {
        "hardware": "CPU (test)", "device": "cpu", "threads": 2,
        "command": "python benchmark.py --throughput", "table_markdown": "| loader | 151.0 |"})
    _, markdown = run_report(tmp_path, source="voc")
    assert "written by `python benchmark.py --throughput` on CPU (test) (cpu, 2 threads)" in markdown
    assert "| loader | 151.0 |" in markdown
