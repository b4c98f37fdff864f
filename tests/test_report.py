"""report.py rebuilds its tables from the result JSONs: every number in the main table equals
the value in the file it names, and missing runs show as "not run" with their command."""
import hashlib
import json
import sys

import pytest

import report
from cli import run_cli


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


def run_report(tmp_path, source="auto", students=None):
    args = report.get_args_parser().parse_args([
        "--outputs", str(tmp_path / "outputs"), "--plots", str(tmp_path / "plots"),
        "--out", str(tmp_path / "report"), "--source", source,
        "--students", str(students or tmp_path / "students")])
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
                     "mious": [0.5 + 0.01 * i, 0.501 + 0.01 * i], "seeds": [0, 1], "n": 2})
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
    assert "| Without KD | 51.05 ± 0.07 | 2 |" in markdown  # every seed
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


# --------------------------------------------------------------------------- the lab's PDF

import re  # noqa: E402
import shutil  # noqa: E402

import report_fixtures  # noqa: E402

import typeset  # noqa: E402
from losses import TERMS  # noqa: E402

STUDENTS = report.REPO_DIR / "students"


def build(tmp_path, tree, students=None, **kwargs):
    """A fixture tree (report_fixtures.demo_tree / voc_tree) and its report; returns
    (main's result, the README's text, the PDF's text as pypdf reads it)."""
    tree(tmp_path, **kwargs)
    if students is None:
        students = tmp_path / "students"
        shutil.copytree(STUDENTS, students, dirs_exist_ok=True)
    result, markdown = run_report(tmp_path, students=students)
    return result, markdown, typeset.pdf_text(tmp_path / "report" / "report.pdf")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo_report")
    return (tmp, *build(tmp, report_fixtures.demo_tree))


@pytest.fixture(scope="module")
def voc_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("voc_report")
    return (tmp, *build(tmp, report_fixtures.voc_tree))


def test_pdf_has_the_title_and_six_sections_in_the_lab_order(demo_report, voc_report):
    for tmp, result, markdown, text in (demo_report, voc_report):
        lines = [line.strip() for line in text.splitlines()]
        where = [lines.index(heading) for heading in report.SECTIONS]  # each a line of its own
        assert where == sorted(where)
        assert lines[0] == "ELEC 475 Lab 3" and "Your Name (20000000)" in text
        assert f"## {report.SECTIONS[0]}" in markdown and markdown.startswith("# ELEC 475 Lab 3")
        assert (tmp / "report" / "report.typ").is_file()


def claims_in_pdf(text, basename):
    """pack.py --check's reading: after the result file's name, the first number with two
    decimals is the claimed mIoU and the next comma-grouped integer the parameters."""
    # a whole name: no_kd_eval.json is also the tail of lab_no_kd_eval.json
    found = list(re.finditer(r"(?<![\w.-])" + re.escape(basename), text))
    assert len(found) == 1, f"{basename} appears {len(found)} times"
    after = text[found[0].end():]
    miou = re.search(r"(?<![\d.])\d+\.\d{2}(?![\d])", after).group(0)
    params = re.search(r"\d{1,3}(?:,\d{3})+", after).group(0)
    return float(miou), int(params.replace(",", ""))


def test_every_number_of_the_lab_tables_is_in_the_pdf_equal_to_its_file(demo_report, voc_report):
    for tmp, result, markdown, text in (demo_report, voc_report):
        claimed = [r for r in result["rows"] if r["result"] is not None]
        assert len(claimed) == (5 if result["source"] == "demo" else 8)
        flat = " ".join(text.split())
        for r in claimed:
            data = json.loads(open(r["path"]).read())  # the file itself, not the report's copy
            assert claims_in_pdf(text, r["path"].rsplit("/", 1)[-1]) == (
                round(100 * data["miou"], 2), data["params"])
            row = (f"{r['label']} {100 * data['miou']:.2f} {data['params']:,} "
                   f"{data['ms_per_image']:.2f} {data['fps']:.1f}")
            assert row in flat, row  # the lab's comparison table
        assert report.REPRODUCE_TITLE in text


def test_demo_pdf_states_each_methods_paired_gain_and_interval(demo_report):
    tmp, result, markdown, text = demo_report
    flat = " ".join(text.split())
    rows = json.loads((tmp / "outputs" / "demo_results.json").read_text())["rows"]
    for r in rows[2:]:
        g = r["paired_gain"]
        assert (f"{100 * g['gain']:+.2f} points over no KD ({g['n']} paired seeds, 95% CI "
                f"{100 * g['ci_low']:+.2f} to {100 * g['ci_high']:+.2f}): {g['verdict']}") in flat


def test_terms_with_weight_zero_do_not_appear(tmp_path):
    runs = {k: report_fixtures.VOC_RUNS[k] for k in ("no_kd", "response_kd")}
    _, markdown, text = build(tmp_path, report_fixtures.voc_tree, runs=runs)
    flat = " ".join(text.split())
    for name, term in TERMS.items():
        names = [term.weight.dest] + [opt.dest for opt in term.params]
        label = getattr(term, "label", None)
        if name == "kd":
            assert "alpha" in flat and "tau" in flat
            assert label is None or label in flat
        else:
            assert not any(n in flat or n in markdown for n in names), name
            assert label is None or (label not in flat and label not in markdown), label


def test_students_text_survives_a_rebuild_byte_for_byte(tmp_path):
    students = tmp_path / "students"
    shutil.copytree(STUDENTS, students)
    own = ("We expected #1 to win, but $5 of 10_000 pixels* changed; ünïcode “quotes”   \n\n"
           "- first point with `code`\n- second point\n\n")  # a blank line at the end
    (students / "discussion.md").write_bytes(own.encode())
    (students / "title.toml").write_text('course = "ELEC 475 Lab 3"\n[[student]]\nname = "Ada '
                                         'Lovelace"\nnumber = "12345678"\n')
    before = snapshot(students)
    for _ in range(2):  # build, then rebuild over it
        _, markdown, text = build(tmp_path, report_fixtures.demo_tree, students=students)
        assert snapshot(students) == before
        assert own.rstrip("\n") in markdown  # the README holds the file byte for byte
    flat = " ".join(text.split())
    assert "We expected #1 to win, but $5 of 10_000 pixels* changed; ünïcode" in flat
    assert "Ada Lovelace (12345678)" in flat
    assert "What challenges came up" not in flat  # the prompts give way to the students' text
    assert "How did you make sure" in flat  # llm_use.md is still the template


def test_page_count_is_printed_and_warned_outside_four_to_six(tmp_path, capsys):
    students = tmp_path / "students"
    shutil.copytree(STUDENTS, students)
    (students / "discussion.md").write_text("\n\n".join(["A long discussion sentence. " * 40] * 30))
    result, _, _ = build(tmp_path, report_fixtures.demo_tree, students=students)
    from pypdf import PdfReader
    pages = len(PdfReader(str(tmp_path / "report" / "report.pdf")).pages)
    assert result["pages"] == pages > 6
    captured = capsys.readouterr()
    assert f"({pages} pages;" in captured.out
    assert f"warning: report.pdf has {pages} pages; the lab asks for 4-6" in captured.err


@pytest.mark.parametrize("epochs,every", [(20, 10), (5, 5)])
def test_curve_titles_fit_their_figure_and_epochs_are_integers(tmp_path, epochs, every):
    """A long run name used to run the mIoU title off the figure's right edge, and the
    epoch axis showed 2.5, 7.5, ... Validated at 10 and 20 only (the demo's old
    --val-every 10) matplotlib's own ticks would be 10, 12.5, 15; validated once (the
    demo's 5-epoch teacher) they were 4.74, 4.80, ..., overlapping."""
    import matplotlib.pyplot as plt

    import plots
    name = "demo_students_2ef8b4c1_alpha0.5_beta0.5_seed0"
    records = [{"epoch": e, "loss_total": 1.0 / e, "val_miou": 0.5 if e % every == 0 else None}
               for e in range(1, epochs + 1)]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = []
    real_savefig = plt.Figure.savefig

    def check(fig, *args, **kwargs):  # the figure as it is saved
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            box = ax.title.get_window_extent(renderer)
            assert 0 <= box.x0 and box.x1 <= fig.bbox.width, ax.title.get_text()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        drawn.append(fig)
        return real_savefig(fig, *args, **kwargs)

    import unittest.mock
    with unittest.mock.patch.object(plt.Figure, "savefig", check):
        plots.plot_history(tmp_path / "history.jsonl", tmp_path, name)
        plots.method_panels([(name, [records, records])], tmp_path / "panels.png")
    assert len(drawn) == 3


def test_compressed_models_evaluated_by_evaluate_py_join_the_compression_section(tmp_path):
    """evaluate.py on compress.py's files (and a fine-tuned pruned student) writes the JSONs
    the report lists; a plain student's evaluation stays out of that table."""
    outputs = tmp_path / "outputs"
    write(outputs / "no_kd_eval.json", fake_eval(0.55317, 1298981, 12.3449))
    files = {"no_kd_last_int8": ("models/compressed/no_kd_last_int8.pt2", "int8", 0.5432),
             "no_kd_pruned50_kd": ("models/no_kd_pruned50_kd_last.pth", None, 0.5012)}
    for stem, (checkpoint, fmt, miou) in files.items():
        data = {**fake_eval(miou, 350021, 7.891), "checkpoint": checkpoint, "num_images": 1449}
        write(outputs / f"{stem}_eval.json", {**data, **({"format": fmt} if fmt else {})})
    _, markdown = run_report(tmp_path, source="voc")
    section = markdown[markdown.index("## Compression"):]
    table = section[section.index("| model | format"):].split("\n\n")[0].splitlines()[2:]
    cells = {row.split(" | ")[0].strip("| `"): row.split(" | ") for row in table}
    assert set(cells) == {checkpoint for checkpoint, _, _ in files.values()}
    int8 = cells["models/compressed/no_kd_last_int8.pt2"]
    assert int8[1:5] == ["int8", "350,021", "54.32", "7.89"]
    assert f"--json {outputs / 'no_kd_last_int8_eval.json'}" in int8[-1]
    assert cells["models/no_kd_pruned50_kd_last.pth"][1:4] == ["checkpoint", "350,021", "50.12"]
