"""demo.py at tiny sizes: its table holds what evaluate.py wrote, nothing is chosen on the
reported images, a second run reuses the teacher and every finished run, and a demo stopped
by SIGINT mid-run, then run again, ends with the table of an unbroken one."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import demo
import engine
import train_kd

pytestmark = pytest.mark.slow
TINY = ["--train", "8", "--val", "4", "--select", "4", "--pretrain", "8", "--size", "40",
        "--teacher-epochs", "1", "--epochs", "2", "--batch-size", "4", "--crop-size", "40",
        "--seeds", "0", "1", "--val-every", "1", "--threads", "2", "--jobs", "1"]


def run_demo(work, progress=False):
    work = Path(work)
    display = [] if progress else ["--no-progress"]
    return demo.main(demo.get_args_parser().parse_args(TINY + display + [
        "--root", str(work / "data"), "--model-dir", str(work / "models"),
        "--output-dir", str(work / "outputs"), "--plot-dir", str(work / "plots")]))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    work = tmp_path_factory.mktemp("unbroken")
    return work, run_demo(work)


def mious(results):
    return {row["method"]: row["mious"] for row in results["rows"]}


def test_the_table_holds_the_evaluations_and_the_paired_gains(unbroken):
    work, results = unbroken
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["teacher", "no_kd", "response_kd", "feature_kd", "combined_kd"]
    evals = sorted((work / "outputs" / "demo").rglob("*_eval.json"))
    assert len(evals) == 1 + 4 * 2  # the teacher, and every method with every seed
    scored = [json.loads(p.read_text()) for p in evals]
    assert sorted(m for row in rows.values() for m in row["mious"]) == sorted(s["miou"] for s in scored)
    base = rows["no_kd"]["mious"]
    for row in list(rows.values())[1:]:  # gain: the mean of the per-seed differences
        diffs = [a - b for a, b in zip(row["mious"], base)]
        assert row["n"] == 2 and row["gain"] == pytest.approx(sum(diffs) / 2)
    assert (work / "plots" / "demo_comparison.png").is_file()


def test_nothing_is_chosen_on_the_reported_images(unbroken):
    """Training validates on 'select'; the table scores final checkpoints on 'val'."""
    work, results = unbroken
    summaries = list((work / "outputs").glob("demo_students_*/summary.json"))
    assert len(summaries) == 8
    for path in summaries:
        assert json.loads(path.read_text())["args"]["val_split"] == "select"
    for path in (work / "outputs" / "demo").rglob("*_eval.json"):
        scored = json.loads(path.read_text())
        assert scored["split"] == "val" and scored["checkpoint"].endswith("_last.pth")
    assert results["reported_split"] == "val" and results["selection_split"] == "select"


def test_a_second_demo_reuses_the_teacher_and_every_finished_run(unbroken, monkeypatch, capsys):
    work, results = unbroken

    def no_training(*args, **kwargs):
        raise AssertionError("the second demo trained again")

    monkeypatch.setattr(train_kd, "main", no_training)
    again = run_demo(work, progress=True)  # progress bars are no part of what a run is
    out = capsys.readouterr().out
    assert "teacher: reusing" in out and out.count("(skipped)") == 8
    assert mious(again) == mious(results)


def test_a_demo_stopped_by_sigint_then_rerun_ends_with_the_unbroken_table(unbroken, tmp_path,
                                                                          monkeypatch, capsys):
    real_step, calls = engine.step, []

    def ctrl_c_at_the_eighth_step(*args):  # the teacher's 2 steps, then 4 per student:
        calls.append(1)                      # the second student's epoch 1 is ending
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C would
        return real_step(*args)

    monkeypatch.setattr(engine, "step", ctrl_c_at_the_eighth_step)
    with pytest.raises(SystemExit) as stopped:
        run_demo(tmp_path)
    assert stopped.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT at the end of epoch 1" in err  # of 2: mid-run
    assert "To finish it, rerun the same python demo.py command" in err
    assert "--resume auto" not in err  # a flag demo.py does not have
    monkeypatch.setattr(engine, "step", real_step)
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
