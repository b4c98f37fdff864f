"""Interrupted runs, resume, non-finite losses and seeds: users lose nothing and are told why.

The killed runs are real subprocesses of train_kd.py; their resumed runs, and the unbroken
run they are compared with, run in this process (same flags, same thread count), so a
bit-identical result also shows that a run does not depend on the process it ran in.
"""
import argparse
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, train_flags

import checkpoints
import losses
import train_kd
from cli import run_cli
from synth import write_synth_voc

STEPS = 8  # training steps per epoch: 16 images, batch 2
# POSIX signals: Windows has no SIGKILL, and a SIGINT sent to pytest's own process there would
# end pytest itself (Ctrl-C reaches a Windows process as a console event, not a signal)
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals (SIGKILL, "
                                "SIGTERM and SIGINT sent by os.kill)")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_synth_voc(root, n_train=16, n_val=3, size=64, seed=1)
    return root


def flags(root, work, *extra):
    """A tiny distillation run: 2 epochs of 8 steps, one DataLoader worker, logs per step."""
    return train_flags(root, work, "--epochs", "2", "--batch-size", "2", "--crop-size", "64",
                       "--limit-val", "3", "--workers", "1", "--lr", "1e-3", "--log-every", "1",
                       "--alpha", "0.5", "--tau", "2", "--teacher", "lite", "--teacher-weights",
                       "none", "--seed", "3", "--out", "run", *extra)


def train_in_process(argv):
    return train_kd.main(train_kd.get_args_parser().parse_args(argv))


def cli(module, argv, monkeypatch):
    """Run ``module`` as its command line does, in this process; returns the exit code."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    try:
        run_cli(module.main, module.get_args_parser())
    except SystemExit as exc:
        return exc.code
    return 0


def tensors(ckpt):
    """Every tensor a checkpoint holds for the model, the optimizer and the adapters."""
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for i, state in ckpt["optimizer"]["state"].items():
        out.update({f"optim.{i}.{k}": v for k, v in state.items()})
    out.update({f"adapters.{k}": v for k, v in (ckpt["adapters"] or {}).items()})
    return out


def assert_same_run(work, reference):
    """Final weights, optimizer state, best mIoU and history equal bit for bit."""
    a = torch.load(work / "models/run_last.pth", weights_only=True)
    b = torch.load(reference / "models/run_last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["partial"] is None
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert a["best_miou"] == b["best_miou"]
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                          for line in path.read_text().splitlines()]
    history = strip(work / "outputs/run/history.jsonl")
    assert [r["epoch"] for r in history] == [1, 2]
    assert history == strip(reference / "outputs/run/history.jsonl")


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """The unbroken run everything else must reproduce."""
    work = tmp_path_factory.mktemp("unbroken")
    train_in_process(flags(tree, work))
    return work


@pytest.mark.slow
def test_two_seeded_runs_write_bit_identical_checkpoints(tree, reference, tmp_path):
    train_in_process(flags(tree, tmp_path))
    assert_same_run(tmp_path, reference)
    a = torch.load(tmp_path / "models/run_best.pth", weights_only=True)
    b = torch.load(reference / "models/run_best.pth", weights_only=True)
    assert a["epoch"] == b["epoch"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_deterministic_flag_turns_on_deterministic_kernels(tree, tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        args = train_kd.get_args_parser().parse_args(flags(tree, tmp_path, "--deterministic",
                                                           "--epochs", "1"))
        train_kd.main(args)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
    finally:
        torch.use_deterministic_algorithms(before)


def launch(tree, work):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train_kd.py"), *flags(tree, work)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_mid_epoch_two(proc, sig):
    """Send ``sig`` once the run has logged step 2 of epoch 2, i.e. while step 3 runs."""
    for line in proc.stdout:
        if line.startswith(f"epoch 2 step 2/{STEPS}"):
            proc.send_signal(sig)
            break
    else:
        pytest.fail(f"the run ended before epoch 2: {proc.stderr.read()[-2000:]}")
    out, err = proc.communicate(timeout=300)
    return out, err


@posix_only
@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resume_auto_finishes_bit_identical(tree, reference, tmp_path,
                                                                        monkeypatch):
    proc = launch(tree, tmp_path)
    _, err = signal_mid_epoch_two(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "stopped by SIGTERM at epoch 2, step" in err and "--resume auto" in err
    ckpt = torch.load(tmp_path / "models/run_last.pth", weights_only=True)
    assert ckpt["epoch"] == 1  # epochs finished; the partial record holds epoch 2 so far
    assert ckpt["partial"]["epoch"] == 2 and 3 <= ckpt["partial"]["step"] < STEPS
    assert not list((tmp_path / "models").glob(".*.tmp"))
    # the same command plus --resume auto (run_cli, as the command line would)
    assert cli(train_kd, flags(tree, tmp_path, "--resume", "auto"), monkeypatch) == 0
    assert_same_run(tmp_path, reference)


@posix_only
@pytest.mark.slow
def test_kill_9_mid_epoch_loses_only_that_epoch(tree, reference, tmp_path):
    proc = launch(tree, tmp_path)
    signal_mid_epoch_two(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(tmp_path / "models/run_last.pth", weights_only=True)  # intact, loadable
    assert ckpt["epoch"] == 1 and ckpt["partial"] is None
    train_in_process(flags(tree, tmp_path, "--resume", "auto"))
    assert_same_run(tmp_path, reference)


@posix_only
@pytest.mark.slow
def test_sigint_saves_mid_epoch_without_worker_processes(tree, tmp_path, monkeypatch):
    """Ctrl-C during the third step of epoch 1; with --workers 0 the augmentations draw from
    the main process's random state, which the partial record restores."""
    argv = flags(tree, tmp_path / "a", "--workers", "0")
    train_in_process(argv)  # the unbroken run for these flags
    real_total, calls = losses.DistillationCriterion.total, []

    def total_with_ctrl_c(self, terms):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, as a user's Ctrl-C
        return real_total(self, terms)

    monkeypatch.setattr(losses.DistillationCriterion, "total", total_with_ctrl_c)
    argv_b = flags(tree, tmp_path / "b", "--workers", "0")
    assert cli(train_kd, argv_b, monkeypatch) == 128 + signal.SIGINT
    ckpt = torch.load(tmp_path / "b/models/run_last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["partial"]["step"] == 3
    assert not (tmp_path / "b/outputs/run/history.jsonl").exists()  # no epoch finished yet
    monkeypatch.setattr(losses.DistillationCriterion, "total", real_total)
    train_in_process(argv_b + ["--resume", "auto"])
    assert_same_run(tmp_path / "b", tmp_path / "a")


def test_non_finite_loss_stops_names_terms_and_remedies_and_keeps_the_checkpoint(
        tree, tmp_path, monkeypatch, capsys):
    argv = flags(tree, tmp_path, "--workers", "0", "--epochs", "1")
    train_in_process(argv)
    last = tmp_path / "models/run_last.pth"
    before = {p.name: p.read_bytes() for p in (tmp_path / "models").iterdir()}
    history = (tmp_path / "outputs/run/history.jsonl").read_text()
    capsys.readouterr()
    # tau = 1e-40 overflows z / tau to inf: the KD term becomes NaN at the first step
    code = cli(train_kd, argv + ["--resume", "auto", "--epochs", "2", "--tau", "1e-40"],
               monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: non-finite loss at epoch 2, step 1/8")
    assert "kd=nan" in err and "ce=" in err  # the terms, by name
    assert "--lr" in err and "--amp" in err and "--tau" in err  # the usual remedies
    assert f"{last} is untouched" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "models").iterdir()} == before
    assert (tmp_path / "outputs/run/history.jsonl").read_text() == history


def resume_warnings(parser, changed):
    """What check_resume_fits logs for a checkpoint whose run had ``changed`` set otherwise."""
    args = parser.parse_args([])
    saved = {**vars(args), changed: "another value"}
    logged = []
    student = argparse.Namespace(model_args={"arch": "lite", "num_classes": 21})
    checkpoints.check_resume_fits({"args": saved}, "run_last.pth", student, args, logged.append)
    return logged


def test_resume_warns_about_every_flag_but_the_few_that_leave_training_alone():
    """The compared flags are derived from the parser, not typed: each train_kd.py flag outside
    checkpoints.NOT_TRAINING is named when it differs, one added to the parser included."""
    parser = train_kd.get_args_parser()
    parser.add_argument("--a-new-training-flag", type=int, default=1)  # as a later issue might
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert checkpoints.NOT_TRAINING < dests  # no name there that the parser lacks
    for dest in sorted(dests):
        logged = resume_warnings(parser, dest)
        if dest in checkpoints.NOT_TRAINING:
            assert logged == [], dest
        else:
            assert len(logged) == 1 and f"--{dest.replace('_', '-')} " in logged[0], dest
