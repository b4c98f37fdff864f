"""Structural channel pruning (pruning.py, compress.py's pruned_channels) and fine-tuning a
pruned student with train_kd.py --init-from, its unpruned self teaching: random weights, CPU."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, train_flags
from torch.utils.flop_counter import FlopCounterMode

import compress
import train_kd
from cli import UserError
from compute import count_params
from nets import build_model, load_model, model_from_checkpoint

pytest.importorskip("torch_pruning", reason="channel pruning needs requirements-optional.txt")


def flops(model, x):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(unpruned lite checkpoint, its channel-pruned 50% checkpoint), as compress.py saves them."""
    torch.manual_seed(0)
    model = build_model("lite").eval()
    folder = tmp_path_factory.mktemp("pruned")
    unpruned = folder / "lite_last.pth"
    torch.save({"model": model.state_dict(), "model_args": dict(model.model_args), "epoch": 3,
                "args": {}}, unpruned)
    pruned, fraction = compress.prune_model(model, 0.5, structured=True)
    path = folder / "lite_last_pruned_channels_0.5.pth"
    compress.save_pruned(pruned, {"epoch": 3, "args": {}}, path, {"sparsity": 0.5})
    return unpruned, path


def test_channel_pruning_removes_channels_and_keeps_the_interface():
    torch.manual_seed(0)
    model = build_model("lite").eval()
    pruned, fraction = compress.prune_model(model, 0.5, structured=True)
    assert fraction == pytest.approx(0.5, abs=0.02)
    x = torch.randn(1, 3, 70, 94)  # odd size: same output shape as the unpruned model's
    assert pruned(x).shape == model(x).shape == (1, 21, 70, 94)
    assert count_params(pruned) <= 0.6 * count_params(model)  # the goal: -40% or more
    assert flops(pruned, x) <= 0.6 * flops(model, x)
    assert pruned.classifier.out_channels == 21 and pruned.backbone[0][0].in_channels == 3
    # the taps carry their own widths, the adapters' inputs; the class keeps the unpruned ones
    _, feats = pruned(x, return_features=True, return_preact=True)
    assert {k: v.shape[1] for k, v in feats.items()} == {**pruned.feature_channels,
                                                        "preact": pruned.preact_channels}
    assert pruned.feature_channels["high"] < 576 and model.feature_channels == {
        "low": 24, "mid": 40, "high": 576} == type(model).FEATURE_CHANNELS
    assert "widths" in pruned.model_args and "widths" not in model.model_args
    assert model.classifier.weight.shape[1] == 96  # the original is untouched


def test_pruned_checkpoint_rebuilds_and_evaluates_in_a_fresh_process(checkpoints, synth_root,
                                                                     tmp_path):
    unpruned, path = checkpoints
    ckpt = torch.load(path, weights_only=True)  # a state dict and widths, nothing pickled
    assert set(ckpt["model_args"]) == {"arch", "num_classes", "widths"}
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "evaluate.py", "--model_path", str(path), "--data-root", str(synth_root),
         "--no-download", "--no-progress", "--device", "cpu", "--threads", "1", "--json",
         str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(out.read_text())
    assert 0 <= scores["miou"] <= 1
    pruned, _ = model_from_checkpoint(path)
    assert scores["params"] == count_params(pruned) < 0.6 * count_params(model_from_checkpoint(
        unpruned)[0])
    # the same logits in this process as the pruned model had when it was saved
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, torch; from nets import model_from_checkpoint; "
         "torch.manual_seed(1); m, _ = model_from_checkpoint(sys.argv[1]); "
         "print(float(m.eval()(torch.randn(1, 3, 40, 56)).sum()))", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    torch.manual_seed(1)
    with torch.no_grad():
        here = float(pruned.eval()(torch.randn(1, 3, 40, 56)).sum())
    assert float(probe.stdout) == pytest.approx(here, rel=1e-5, abs=1e-4)


def test_a_pruned_checkpoint_teaches_and_loads_as_weights_too(checkpoints):
    """load_model (--teacher-weights PATH) rebuilds a pruned student from its model_args."""
    _, path = checkpoints
    model = load_model("lite", str(path))
    assert count_params(model) == count_params(model_from_checkpoint(path)[0])


def test_init_from_fine_tunes_the_pruned_student_with_the_unpruned_one_teaching(
        checkpoints, synth_root, tmp_path):
    unpruned, pruned_path = checkpoints
    args = train_kd.get_args_parser().parse_args(train_flags(
        synth_root, tmp_path, "--out", "pruned_kd", "--limit-train", "8", "--init-from",
        str(pruned_path), "--teacher", "lite", "--teacher-weights", str(unpruned),
        "--alpha", "0.5", "--beta", "1"))
    run = train_kd.start(args, train_kd.Distributed.from_env("cpu"))
    train_kd.build_loaders(run)
    train_kd.build_models(run)
    teacher_model, student_model = (model_from_checkpoint(p)[0].eval()
                                    for p in (unpruned, pruned_path))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        # the teacher is the unpruned student, its weights; the student starts as the pruned one
        assert torch.equal(run.distiller.teacher(x)[0], teacher_model(x))
        assert torch.equal(run.student.eval()(x), student_model(x))
    assert count_params(run.student) == count_params(student_model) < count_params(teacher_model)
    # the feature adapters map the pruned taps to the unpruned widths
    adapters = run.adapters.adapters
    assert {k: a.in_channels for k, a in adapters.items()} == student_model.feature_channels
    assert {k: a.out_channels for k, a in adapters.items()} == {"low": 24, "mid": 40, "high": 576}
    # one epoch, end to end: the checkpoint keeps the pruned widths and evaluates alone
    summary = train_kd.main(args)
    assert summary["params"] == count_params(student_model)
    last, _ = model_from_checkpoint(tmp_path / "models/pruned_kd_last.pth")
    assert last.model_args == student_model.model_args
    history = (tmp_path / "outputs/pruned_kd/history.jsonl").read_text().splitlines()
    record = json.loads(history[-1])
    assert record["loss_kd"] > 0 and record["loss_feat"] > 0
    # resuming it without --init-from would build an unpruned student: refused, saying why
    plain = train_kd.get_args_parser().parse_args(train_flags(
        synth_root, tmp_path, "--out", "pruned_kd", "--limit-train", "8", "--resume", "auto"))
    with pytest.raises(UserError, match="channel-pruned lite .* own --init-from"):
        train_kd.main(plain)
