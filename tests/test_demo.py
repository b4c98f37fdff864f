"""demo.py at tiny sizes: its table holds what evaluate.py wrote, nothing is chosen on the
reported images, a second run reuses the teacher and every finished run, and a demo stopped
by SIGINT mid-run, then run again, ends with the table of an unbroken one."""
import contextlib
import io
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

import demo
import engine
import sweep
import train_kd

pytestmark = pytest.mark.slow
TINY = ["--train", "8", "--val", "4", "--select", "4", "--pretrain", "8", "--size", "40",
        "--teacher-epochs", "1", "--epochs", "2", "--batch-size", "4", "--crop-size", "40",
        "--seeds", "0", "1", "--val-every", "1", "--threads", "2", "--jobs", "1"]


def run_demo(work, progress=False, *flags):
    work = Path(work)
    display = [] if progress else ["--no-progress"]
    return demo.main(demo.get_args_parser().parse_args(TINY + display + [*flags,
        "--root", str(work / "data"), "--model-dir", str(work / "models"),
        "--output-dir", str(work / "outputs"), "--plot-dir", str(work / "plots")]))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    work = tmp_path_factory.mktemp("unbroken")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = run_demo(work)
    return work, results, printed.getvalue()


def planned_runs(work, monkeypatch, *flags):
    """{method: [(run name, its train_kd.py argv)], seed by seed} that a demo with ``flags``
    hands to sweep.py, planned as sweep.py plans them, nothing trained."""
    def plan(own, rerun=None):
        axes, fixed, _ = sweep.split_flags(own.train_flags)
        return {"runs": sweep.grid(own, axes, fixed)}

    monkeypatch.setattr(sweep, "main", plan)
    args = demo.get_args_parser().parse_args(TINY + ["--output-dir", str(work / "outputs"),
                                                     "--model-dir", str(work / "models"), *flags])
    trees = {"students": work / "data" / "students"}
    teacher = work / "teacher_last.pth"
    runs = demo.train_students(args, trees, {"data": "settings"}, teacher)["runs"]
    planned = {}
    for run in runs:
        planned.setdefault(demo.method_of(run["setting"]), []).append((run["name"], run["argv"]))
    return planned


def test_the_no_kd_runs_are_shared_by_every_alpha_and_beta(tmp_path, monkeypatch):
    """A run is named (so its checkpoint, history and result files are found) by the flags
    that change its training: --alpha and --beta change the KD runs alone."""
    a = planned_runs(tmp_path, monkeypatch, "--alpha", "0.5", "--beta", "0.5")
    b = planned_runs(tmp_path, monkeypatch, "--alpha", "0.9", "--beta", "2")
    assert a["no_kd"] == b["no_kd"] and len(a["no_kd"]) == 2  # one per seed, names and flags
    for method in ("response_kd", "feature_kd", "combined_kd"):
        assert not {n for n, _ in a[method]} & {n for n, _ in b[method]}, method
    only_alpha = planned_runs(tmp_path, monkeypatch, "--alpha", "0.9", "--beta", "0.5")
    assert only_alpha["feature_kd"] == a["feature_kd"]  # beta alone shapes feature KD
    # --tau names every run of the one sweep, no KD's too (demo.students_sweep_name says why)
    other_tau = planned_runs(tmp_path, monkeypatch, "--alpha", "0.5", "--beta", "0.5",
                             "--tau", "2")
    assert not {n for n, _ in a["no_kd"]} & {n for n, _ in other_tau["no_kd"]}


def test_ema_decay_reaches_every_student_run_and_names_them_only_when_on(tmp_path, monkeypatch):
    plain = planned_runs(tmp_path, monkeypatch)
    off = planned_runs(tmp_path, monkeypatch, "--ema-decay", "0")
    ema = planned_runs(tmp_path, monkeypatch, "--ema-decay", "0.99")
    assert off == plain  # a demo without it trains and names the runs it always did
    for method, runs in ema.items():
        for name, argv in runs:
            assert argv[argv.index("--ema-decay") + 1] == "0.99", method
        assert not {n for n, _ in runs} & {n for n, _ in plain[method]}, method
    assert all("--ema-decay" not in argv for runs in plain.values() for _, argv in runs)


def test_a_students_sweep_named_before_alpha_and_beta_left_its_key_is_still_found(tmp_path):
    args = demo.get_args_parser().parse_args(["--output-dir", str(tmp_path)])
    settings, teacher, shared = {"data": "settings"}, "teacher_last.pth", ["--epochs", "2"]
    axes = ["--alpha", "0", "0.5", "--beta", "0", "0.5"]
    before = "demo_students_24681158"  # demo.py's key() at 6287003 gave this for these flags
    assert demo.students_sweep_name(args, settings, teacher, shared, axes) != before
    (tmp_path / "sweep" / before).mkdir(parents=True)  # a results folder of that demo
    assert demo.students_sweep_name(args, settings, teacher, shared, axes) == before


def mious(results):
    return {row["method"]: row["mious"] for row in results["rows"]}


def test_the_table_holds_the_evaluations_and_the_paired_gains(unbroken):
    work, results, _ = unbroken
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["teacher", "no_kd", "response_kd", "feature_kd", "combined_kd"]
    evals = sorted((work / "outputs" / "demo").rglob("*_eval.json"))
    assert len(evals) == 1 + 4 * 2  # the teacher, and every method with every seed
    scored = [json.loads(p.read_text()) for p in evals]
    assert sorted(m for row in rows.values() for m in row["mious"]) == sorted(s["miou"] for s in scored)
    base = rows["no_kd"]["mious"]
    for row in list(rows.values())[2:]:  # gain: the mean of the per-seed differences
        diffs = [a - b for a, b in zip(row["mious"], base)]
        assert row["n"] == 2 and row["paired_gain"]["gain"] == pytest.approx(sum(diffs) / 2)
        assert row["paired_gain"]["seeds"] == row["seeds"] == [0, 1]
    assert "paired_gain" not in rows["no_kd"] and "paired_gain" not in rows["teacher"]
    assert (work / "plots" / "demo_comparison.png").is_file()


def test_the_verdicts_in_the_json_are_those_of_the_printed_table(unbroken):
    work, results, _ = unbroken
    saved = json.loads((work / "outputs" / "demo_results.json").read_text())
    assert saved["table_markdown"] == results["table_markdown"]
    lines = saved["table_markdown"].splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {row[0]: dict(zip(head, row)) for row in
             ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    for row in saved["rows"]:
        printed = cells[row["method"]]
        assert printed["n"] == str(len(row["mious"]))
        g = row.get("paired_gain")
        assert printed["verdict"] == (g["verdict"] if g else "")
        if g:
            assert printed["gain over no KD, 95% CI (paired t)"].startswith(f"{100 * g['gain']:+.2f} [")
            assert g["verdict"] == ("helps" if g["ci_low"] > 0 else "hurts" if g["ci_high"] < 0
                                    else "no difference detectable with 2 seeds")


def test_the_expected_method_is_named_on_select_before_val_is_scored(unbroken):
    work, results, out = unbroken
    on_select = results["expected_best_on_select"]
    assert set(on_select) == {"response_kd", "feature_kd", "combined_kd"}
    assert results["expected_best"] == max(on_select, key=lambda m: on_select[m]["gain"])
    named = out.index(f"expected to help most, chosen on 'select' before 'val' is scored: "
                      f"{results['expected_best']}")
    first_student_score = out.index("$ python evaluate.py --model_path " + str(work / "models" / "demo_students_"))
    assert named < first_student_score


def test_nothing_is_chosen_on_the_reported_images(unbroken):
    """Training validates on 'select'; the table scores final checkpoints on 'val'."""
    work, results, _ = unbroken
    summaries = list((work / "outputs").glob("demo_students_*/summary.json"))
    assert len(summaries) == 8
    for path in summaries:
        assert json.loads(path.read_text())["args"]["val_split"] == "select"
    for path in (work / "outputs" / "demo").rglob("*_eval.json"):
        scored = json.loads(path.read_text())
        assert scored["split"] == "val" and scored["checkpoint"].endswith("_last.pth")
    assert results["reported_split"] == "val" and results["selection_split"] == "select"


def test_a_second_demo_reuses_the_teacher_and_every_finished_run(unbroken, monkeypatch, capsys):
    work, results, _ = unbroken

    def no_training(*args, **kwargs):
        raise AssertionError("the second demo trained again")

    monkeypatch.setattr(train_kd, "main", no_training)
    again = run_demo(work, progress=True)  # progress bars are no part of what a run is
    out = capsys.readouterr().out
    assert "teacher: reusing" in out and out.count("(skipped)") == 8
    assert mious(again) == mious(results)


def test_a_demo_stopped_by_sigint_then_rerun_ends_with_the_unbroken_table(unbroken, tmp_path,
                                                                          monkeypatch, capsys):
    real_step, calls = engine.backward_and_step, []

    def ctrl_c_at_the_eighth_step(*args):  # the teacher's 2 steps, then 4 per student:
        calls.append(1)                      # the second student's epoch 1 is ending
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C would
        return real_step(*args)

    monkeypatch.setattr(engine, "backward_and_step", ctrl_c_at_the_eighth_step)
    with pytest.raises(SystemExit) as stopped:
        run_demo(tmp_path)
    assert stopped.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT at the end of epoch 1" in err  # of 2: mid-run
    assert "To finish it, rerun the same python demo.py command" in err
    assert "--resume auto" not in err  # a flag demo.py does not have
    monkeypatch.setattr(engine, "backward_and_step", real_step)
    assert mious(run_demo(tmp_path)) == mious(unbroken[1])
    # the tiny students' scores barely move: their weights must be the unbroken run's, bit for bit
    setting = lambda path: path.name.split("_", 3)[3]  # demo_students_<settings key>_<setting>
    finals = {setting(p): p for p in (unbroken[0] / "models").glob("demo_students_*_last.pth")}
    resumed = {setting(p): p for p in (tmp_path / "models").glob("demo_students_*_last.pth")}
    assert len(finals) == 8 and set(resumed) == set(finals)
    for name, path in finals.items():
        expected = torch.load(path, weights_only=True)["model"]
        got = torch.load(resumed[name], weights_only=True)["model"]
        assert all(torch.equal(v, got[k]) for k, v in expected.items()), name


def test_a_demo_with_another_alpha_trains_only_the_runs_alpha_shapes(unbroken, capsys):
    """Last in this file: it adds runs to the unbroken demo's folders, which the tests above
    count. The no-KD and feature-KD runs are reused as they are; response and combined KD,
    which --alpha shapes, are trained anew."""
    work, results, _ = unbroken
    capsys.readouterr()
    again = run_demo(work, False, "--alpha", "0.9")
    out = capsys.readouterr().out
    skipped = {line.split(":")[0] for line in out.splitlines() if line.endswith("(skipped)")}
    trained = set(re.findall(r"^== (\S+): python train_kd.py", out, re.MULTILINE))
    assert "teacher: reusing" in out and len(skipped) == len(trained) == 4
    assert all("_alpha0_" in name for name in skipped)  # no KD and feature KD, both seeds
    assert all("_alpha0.9_" in name for name in trained)  # response and combined KD
    for method in ("no_kd", "feature_kd"):
        assert mious(again)[method] == mious(results)[method]
