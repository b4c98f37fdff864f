"""train_kd.py and evaluate.py: the training loop, distillation, checkpoints, resume."""
import json
import shutil

import pytest
import torch
from conftest import train_flags
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import compute
import distill
import evaluate
import nets
import train_kd
from cli import UserError
from data import build_dataset, eval_loader, to_model_input, train_transforms
from distill import Distiller, FeatureAdapters, FrozenTeacher
from engine import evaluate as run_evaluation
from engine import train_one_epoch
from losses import DistillationCriterion, Outputs
from nets import build_model, model_from_checkpoint


def train_args(root, tmp_path, *extra):
    return train_kd.get_args_parser().parse_args(train_flags(
        root, tmp_path, "--epochs", "2", "--limit-train", "8", "--lr", "1e-3", *extra))


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory, synth_root):
    """A repo checkpoint of a random 'lite' model, to teach offline."""
    torch.manual_seed(5)
    model = build_model("lite")
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": model.state_dict(), "model_args": model.model_args}, path)
    return path


def test_plain_run_writes_history_checkpoints_plots_and_never_builds_a_teacher(
        synth_root, tmp_path, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not be built when alpha = beta = 0")

    monkeypatch.setattr(distill, "load_model", no_teacher)
    monkeypatch.setattr(distill, "FrozenTeacher", no_teacher)
    summary = train_kd.main(train_args(synth_root, tmp_path, "--out", "plain"))
    records = [json.loads(x) for x in (tmp_path / "outputs/plain/history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"loss_ce", "loss_total", "val_miou", "lr", "epoch_seconds"} <= set(r)
    assert (tmp_path / "plots/plain_loss.png").stat().st_size > 1000
    assert (tmp_path / "plots/plain_miou.png").stat().st_size > 1000
    assert summary["train_seconds_total"] > 0
    ckpt = torch.load(tmp_path / "models/plain_last.pth", weights_only=True)
    assert {"model", "model_args", "optimizer", "scheduler", "scaler", "epoch", "args",
            "best_miou"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["model_args"] == {"arch": "lite", "num_classes": 21}
    # an existing run is not overwritten by accident
    with pytest.raises(UserError, match="--resume .*plain_last.pth"):
        train_kd.main(train_args(synth_root, tmp_path, "--out", "plain"))


def test_val_every_skips_validation_but_always_scores_the_last_epoch(synth_root, tmp_path):
    summary = train_kd.main(train_args(synth_root, tmp_path, "--out", "sparse", "--epochs", "3",
                                       "--val-every", "2"))
    records = [json.loads(x) for x in (tmp_path / "outputs/sparse/history.jsonl").read_text().splitlines()]
    assert [r["val_miou"] is not None for r in records] == [False, True, True]  # 2, and the last
    assert json.loads((tmp_path / "outputs/sparse/val_last.json").read_text())["epoch"] == 3
    assert summary["final_miou"] == records[-1]["val_miou"]
    assert summary["best_miou"] == max(records[1]["val_miou"], records[2]["val_miou"])
    assert torch.load(tmp_path / "models/sparse_last.pth", weights_only=True)["epoch"] == 3
    assert (tmp_path / "plots/sparse_miou.png").stat().st_size > 1000


def test_distillation_run_logs_every_term_and_keeps_adapters_apart(
        synth_root, small_teacher, tmp_path):
    train_kd.main(train_args(synth_root, tmp_path, "--out", "kd", "--epochs", "1", "--alpha",
                             "0.5", "--beta", "1", "--teacher", "lite", "--teacher-weights",
                             str(small_teacher)))
    record = json.loads((tmp_path / "outputs/kd/history.jsonl").read_text().splitlines()[0])
    for term in ("ce", "kd", "feat", "feat_low", "feat_mid", "feat_high", "total"):
        assert f"loss_{term}" in record
    assert record["loss_total"] == pytest.approx(
        0.5 * record["loss_ce"] + 0.5 * record["loss_kd"] + record["loss_feat"], rel=1e-4)
    ckpt = torch.load(tmp_path / "models/kd_best.pth", weights_only=True)
    assert ckpt["adapters"] is not None
    assert not any("adapter" in k for k in ckpt["model"])
    model, _ = model_from_checkpoint(tmp_path / "models/kd_best.pth")  # no adapters needed
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in ckpt["model"].items()
                                                             if "running" not in k and "num_batches" not in k)


def train_keeping_epoch_one(args, copy, monkeypatch):
    """Train, keeping a copy of the checkpoint as it stood after epoch 1."""
    real_save = train_kd.torch_save

    def keep_epoch_one(state, path):
        real_save(state, path)
        if state["epoch"] == 1 and str(path).endswith("_last.pth"):
            shutil.copy(path, copy)

    monkeypatch.setattr(train_kd, "torch_save", keep_epoch_one)
    train_kd.main(args)
    monkeypatch.setattr(train_kd, "torch_save", real_save)


def assert_same_run(tmp_path, unbroken, unbroken_history):
    resumed = torch.load(tmp_path / "models/run_last.pth", weights_only=True)
    assert resumed["epoch"] == unbroken["epoch"] == 2
    for key, value in unbroken["model"].items():
        assert torch.equal(value, resumed["model"][key]), key  # bit-identical on CPU
    assert resumed["best_miou"] == unbroken["best_miou"]
    history = (tmp_path / "outputs/run/history.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "seconds" not in k}
    assert [strip(x) for x in history] == [strip(x) for x in unbroken_history]
    return resumed


def test_resume_after_epoch_one_equals_an_unbroken_run(synth_root, tmp_path, monkeypatch):
    args = ["--out", "run", "--alpha", "0.5", "--teacher", "lite", "--teacher-weights", "none"]
    train_keeping_epoch_one(train_args(synth_root, tmp_path, *args), tmp_path / "epoch1.pth",
                            monkeypatch)
    unbroken = torch.load(tmp_path / "models/run_last.pth", weights_only=True)
    unbroken_history = (tmp_path / "outputs/run/history.jsonl").read_text().splitlines()

    train_kd.main(train_args(synth_root, tmp_path, *args, "--resume", str(tmp_path / "epoch1.pth")))
    assert_same_run(tmp_path, unbroken, unbroken_history)


def test_resume_reuses_the_runs_thread_count(synth_root, tmp_path, monkeypatch, capsys):
    """CPU bits depend on the thread count: a resume without --threads takes the run's own
    (1 here) rather than the automatic choice (made 2 here), and so equals the unbroken run."""
    monkeypatch.setattr(compute, "usable_cores", lambda: 2)
    monkeypatch.setattr(compute, "busy_cores", lambda seconds=0.3: 0)
    monkeypatch.setattr(compute, "TORCH_DEFAULT_THREADS", 2)
    args = ["--out", "run", "--alpha", "0.5", "--teacher", "lite", "--teacher-weights", "none"]
    train_keeping_epoch_one(train_args(synth_root, tmp_path, *args, "--threads", "1"),
                            tmp_path / "epoch1.pth", monkeypatch)
    unbroken = torch.load(tmp_path / "models/run_last.pth", weights_only=True)
    unbroken_history = (tmp_path / "outputs/run/history.jsonl").read_text().splitlines()
    capsys.readouterr()

    resume = train_args(synth_root, tmp_path, *args, "--resume", str(tmp_path / "epoch1.pth"))
    resume.threads = None  # as if --threads were not on the command line
    train_kd.main(resume)
    assert "threads: 1 (the resumed run's count; --threads overrides)" in capsys.readouterr().out
    assert assert_same_run(tmp_path, unbroken, unbroken_history)["args"]["threads"] == 1


class _BrightnessTeacher(nn.Module):
    """A fixed teacher that labels each region by its brightness tercile: classes 0, 3, 8.

    Brightness is averaged over 17x17 windows, so the answer changes at region scale, not at
    every texture stripe (which a stride-8 student could not follow); the two thresholds are
    the terciles over the images it will see, so each class covers about a third.
    """

    def __init__(self, images):
        super().__init__()
        lum = torch.cat([self.brightness(x).flatten() for x in images])
        self.register_buffer("t", torch.quantile(lum, torch.tensor([1 / 3, 2 / 3])))

    @staticmethod
    def brightness(x):
        return nn.functional.avg_pool2d(x.mean(1, keepdim=True), 17, stride=1, padding=8,
                                        count_include_pad=False)

    def forward(self, x):
        lum = self.brightness(x)[:, 0]
        logits = torch.full((x.shape[0], 21, *x.shape[-2:]), -20.0)
        logits[:, 0] = 8 * (self.t[0] - lum)
        logits[:, 3] = 8 * torch.minimum(lum - self.t[0], self.t[1] - lum)
        logits[:, 8] = 8 * (lum - self.t[1])
        return logits, {}


def _agreement(student, teacher, loader):
    student.eval()
    hits = total = 0
    with torch.no_grad():
        for images, _ in loader:
            images = to_model_input(images)
            hits += (student(images).argmax(1) == teacher(images)[0].argmax(1)).sum().item()
            total += images.shape[0] * images.shape[-1] * images.shape[-2]
    return hits / total


@pytest.mark.slow
def test_distillation_alone_makes_the_student_agree_with_the_teacher(synth_root):
    torch.manual_seed(0)
    # mild scale jitter: the agreement is scored on full-size images
    train = build_dataset(synth_root, "train", download=False,
                          transforms=train_transforms(64, scale=(0.8, 1.25)))
    fixed = eval_loader(synth_root, download=False, split="train")  # full images, no randomness
    teacher = _BrightnessTeacher([to_model_input(x) for x, _ in fixed])
    student = build_model("lite")
    before = _agreement(student, teacher, fixed)
    majority = max(_class_share(teacher, fixed).values())
    criterion = DistillationCriterion({"kd": 1.0}, {"tau": 4.0})
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 32)
    # labels unused: with alpha = 1 the CE weight is 0 (poison them to be sure)
    loader = DataLoader(train, batch_size=4, shuffle=True, drop_last=True)
    for epoch in range(32):
        batches = [(x, torch.full_like(y, 5)) for x, y in loader]
        train_one_epoch(Distiller(student, criterion, teacher), criterion, optimizer, batches,
                        torch.device("cpu"), epoch, progress=False)
        scheduler.step()
    after = _agreement(student, teacher, fixed)
    assert majority < 0.5  # a constant answer cannot pass the bar below
    # measured over seeds 0-2: 0.84-0.85 after, 0.00-0.33 before
    assert before < 0.5 and after > 0.75, (before, after)


def _class_share(teacher, loader):
    counts = torch.zeros(21)
    for images, _ in loader:
        counts += torch.bincount(teacher(to_model_input(images))[0].argmax(1).flatten(), minlength=21)
    return {c: float(v / counts.sum()) for c, v in enumerate(counts) if v > 0}


def test_gradients_reach_student_and_adapters_never_the_teacher(synth_root, small_teacher):
    teacher_model = nets.load_model("lite", str(small_teacher))
    teacher = FrozenTeacher(teacher_model, "lite")
    buffers = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("lite")
    adapters = FeatureAdapters(student.FEATURE_CHANNELS, teacher.channels)
    dataset = build_dataset(synth_root, "train", crop_size=48, download=False)
    loader = DataLoader(dataset, batch_size=4, drop_last=True)
    criterion = DistillationCriterion({"kd": 0.5, "feat": 1.0}, {"tau": 4.0})
    optimizer = torch.optim.SGD(list(student.parameters()) + list(adapters.parameters()), lr=0.1)
    images, targets = next(iter(loader))
    teacher.train()  # a parent's .train() must not unfreeze the teacher
    x, y = to_model_input(images, targets)  # what train_one_epoch feeds the nets
    t_logits, t_feats = teacher(x)
    logits, s_feats = student(x, return_features=True)
    terms = criterion(Outputs(logits, s_feats, adapters(s_feats)), y, Outputs(t_logits, t_feats))
    criterion.total(terms).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()
               if p.requires_grad and p.dim() > 1)  # every conv and linear weight
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    train_one_epoch(Distiller(student, criterion, teacher, adapters), criterion, optimizer,
                    [(images, targets)], torch.device("cpu"), 0, progress=False)
    for k, v in teacher.state_dict().items():  # BN running statistics included
        assert torch.equal(v, buffers[k]), k


def test_torchvision_teacher_gives_logits_and_resnet_features():
    model = build_model("fcn_resnet50")
    teacher = FrozenTeacher(model, "fcn_resnet50")
    logits, feats = teacher(torch.randn(1, 3, 67, 45))
    assert logits.shape == (1, 21, 67, 45)
    assert {k: v.shape[1] for k, v in feats.items()} == {"low": 256, "mid": 512, "high": 2048}
    assert teacher.channels == {"low": 256, "mid": 512, "high": 2048}


def test_saved_checkpoint_evaluates_with_evaluate_py_alone(synth_root, tmp_path):
    train_kd.main(train_args(synth_root, tmp_path, "--out", "ev", "--epochs", "1"))
    ckpt = tmp_path / "models/ev_best.pth"
    out = tmp_path / "ev.json"
    # in this process: the command line itself runs as a subprocess in test_real_path
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--model_path", str(ckpt), "--data-root", str(synth_root), "--device", "cpu",
        "--workers", "0", "--limit", "4", "--json", str(out), "--visualize", "--num_images", "2",
        "--output-dir", str(tmp_path / "outputs")]))
    result = json.loads(out.read_text())
    for key in ("miou", "pixel_accuracy", "per_class_iou", "params", "ms_per_image", "fps",
                "device", "num_images"):
        assert key in result
    model, _ = model_from_checkpoint(ckpt)
    reference = run_evaluation(model, eval_loader(synth_root, 4, download=False),
                               torch.device("cpu"), progress=False)
    assert result["miou"] == pytest.approx(reference["miou"], abs=1e-6)
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert len(result["overlays"]) == 2
    overlays = sorted((tmp_path / "outputs" / "ev_best_overlays").glob("*.png"))
    assert [str(p) for p in overlays] == sorted(result["overlays"])
    assert all(Image.open(p).size[0] > 0 for p in overlays)


def test_evaluate_refuses_a_bare_state_dict(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(build_model("lite").state_dict(), path)
    with pytest.raises(UserError, match="does not say which model"):
        evaluate.main(evaluate.get_args_parser().parse_args(["--model_path", str(path)]))


def test_loss_sums_on_the_device_log_the_means_of_python_float_sums():
    """The loop keeps its sums on the device; the logged means must be those of adding each
    step's float32 values as Python floats (double precision), as the history always had."""
    from engine import LossSums

    torch.manual_seed(0)
    steps = [{"ce": torch.rand(()) * 3, "kd": torch.rand(()) * 1e4} for _ in range(50)]
    sums = LossSums(torch.device("cpu"))
    expected = {"ce": 0.0, "kd": 0.0, "total": 0.0}
    for terms in steps:
        total = 0.5 * terms["ce"] + 0.5 * terms["kd"]
        sums.add(terms, total)
        for name, value in [*terms.items(), ("total", total)]:
            expected[name] += float(value)
    assert sums.means() == {f"loss_{k}": v / len(steps) for k, v in expected.items()}
    # a partial epoch continues from the checkpoint's Python floats
    resumed = LossSums(torch.device("cpu"), sums.read(), sums.batches)
    assert resumed.means() == sums.means()


def test_step_check_catches_a_non_finite_loss_and_reads_the_stop_request():
    from engine import StepCheck

    class Stop:
        signum = None

    stop = Stop()
    check = StepCheck(stop)
    assert check(torch.tensor(1.0)) == (False, False)
    assert check(torch.tensor(float("nan")))[0] and check(torch.tensor(float("inf")))[0]
    stop.signum = 15
    assert check(torch.tensor(1.0)) == (False, True)
