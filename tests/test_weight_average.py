"""train_kd.py --ema-decay: the weight average it validates and saves, written out by hand here;
the same training underneath; an exact resume; off by default."""
import os
import signal

import pytest
import torch
from conftest import train_flags
from torch import nn

import engine
import losses
import train_kd
from cli import UserError, run_cli
from distill import build_weight_average
from synth import write_synth_voc

DECAY = 0.6  # far from 1, so that every step's weights weigh in an 8-step run
STEPS = 8  # 2 epochs of 4 steps


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_synth_voc(root, n_train=8, n_val=3, size=48, seed=1)
    return root


def flags(root, work, *extra):
    """2 epochs of 4 steps (8 images, batch 2), plain training, no worker processes."""
    return train_flags(root, work, "--epochs", "2", "--batch-size", "2", "--crop-size", "48",
                       "--limit-val", "3", "--lr", "1e-3", "--seed", "3", "--out", "run", *extra)


def train(argv):
    return train_kd.main(train_kd.get_args_parser().parse_args(argv))


def last(work):
    return torch.load(work / "models/run_last.pth", weights_only=True)


def by_hand(states, decay):
    """The EMA of a list of state dicts: the first copied, then e <- d * e + (1 - d) * w."""
    average = {k: v.double().clone() for k, v in states[0].items()}
    for state in states[1:]:
        for k, v in state.items():
            average[k] = decay * average[k] + (1 - decay) * v.double()
    return average


def test_the_average_of_weights_and_batchnorm_statistics_follows_its_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    average = build_weight_average(model, DECAY)
    states = []
    for _ in range(5):  # a "step": new weights, and a forward pass that moves the BN statistics
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 8, 8))
        average.update_parameters(model)
        states.append({k: v.clone() for k, v in model.state_dict().items()
                       if v.is_floating_point()})
    expected = by_hand(states, DECAY)
    got = average.module.state_dict()
    assert {"1.running_mean", "1.running_var", "0.weight"} <= expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert build_weight_average(model, 0.0) is None


@pytest.fixture(scope="module")
def ema_run(tree, tmp_path_factory):
    """An unbroken run with the average, and the student's parameters after each of its steps."""
    work, steps, real_step = tmp_path_factory.mktemp("ema"), [], engine.backward_and_step

    def step_and_record(optimizer, total, scaler):
        real_step(optimizer, total, scaler)
        steps.append([p.detach().clone() for p in optimizer.param_groups[0]["params"]])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "backward_and_step", step_and_record)
        summary = train(flags(tree, work, "--ema-decay", str(DECAY)))
    return work, steps, summary


def test_an_ema_run_trains_the_same_weights_and_saves_their_average(tree, ema_run, tmp_path):
    work, steps, summary = ema_run
    train(flags(tree, tmp_path / "plain"))
    plain, ema = last(tmp_path / "plain"), last(work)
    assert "train_model" not in plain and "ema_updates" not in plain  # off by default
    assert ema["train_model"].keys() == plain["model"].keys()
    for k, v in plain["model"].items():  # the average is a copy beside training: same bits
        assert torch.equal(ema["train_model"][k], v), k
    assert ema["ema_updates"] == len(steps) == STEPS
    names = [k for k, _ in train_kd.build_student("lite", pretrained_backbone=False)
             .named_parameters()]
    expected = by_hand([dict(zip(names, step)) for step in steps], DECAY)
    for k in names:
        torch.testing.assert_close(ema["model"][k].double(), expected[k], rtol=1e-4, atol=1e-6,
                                   msg=k)
    assert not torch.equal(ema["model"][names[0]], ema["train_model"][names[0]])
    # validation scored the average, which is what the checkpoint's model holds
    model, _ = train_kd.model_from_checkpoint(work / "models/run_last.pth")
    scored = engine.evaluate(model, train_kd.eval_loader(str(tree), 3, 0, False, split="val"),
                             torch.device("cpu"), warmup=0, progress=False)
    assert summary["final_miou"] == pytest.approx(scored["miou"], abs=1e-9)


def test_an_ema_run_stopped_mid_epoch_resumes_to_the_unbroken_bits(tree, ema_run, tmp_path,
                                                                  monkeypatch):
    real_total, calls = losses.DistillationCriterion.total, []

    def total_with_ctrl_c(self, terms):
        calls.append(1)
        if len(calls) == STEPS // 2 + 3:  # step 3 of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_total(self, terms)

    monkeypatch.setattr(losses.DistillationCriterion, "total", total_with_ctrl_c)
    argv = flags(tree, tmp_path / "b", "--ema-decay", str(DECAY))
    monkeypatch.setattr("sys.argv", ["train_kd.py", *argv])
    with pytest.raises(SystemExit) as stopped:
        run_cli(train_kd.main, train_kd.get_args_parser())
    assert stopped.value.code == 128 + signal.SIGINT
    assert last(tmp_path / "b")["partial"]["step"] == 3
    monkeypatch.setattr(losses.DistillationCriterion, "total", real_total)
    train(argv + ["--resume", "auto"])
    a, b = last(ema_run[0]), last(tmp_path / "b")
    assert a["ema_updates"] == b["ema_updates"] == STEPS
    for part in ("model", "train_model"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


def test_resuming_a_run_without_an_average_with_ema_decay_is_refused(tree, tmp_path):
    train(flags(tree, tmp_path, "--epochs", "1"))
    with pytest.raises(UserError, match="ema-decay.*does not fit|does not fit.*ema-decay"):
        train(flags(tree, tmp_path, "--resume", "auto", "--ema-decay", "0.9"))
