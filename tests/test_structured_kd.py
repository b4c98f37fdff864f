"""Beyond Hinton: pixel-wise, pair-wise, attention-transfer and channel-wise distillation,
progressive schedules, the pre-activation taps, and the off-the-shelf LR-ASPP student."""
import itertools
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import train_flags
from torch import nn
from torch.utils.data import DataLoader

import cli
import evaluate
import train_kd
from cli import UserError
from data import build_dataset, to_model_input
from distill import Distiller, FeatureAdapters, FrozenTeacher, feature_taps
from engine import train_one_epoch
from losses import (DistillationCriterion, Outputs, attention_transfer_loss,
                    cwd_loss, kd_weight_scale, pairwise_similarity_loss,
                    pixelwise_preact_loss)
from nets import build_model, model_from_checkpoint

# ---------------------------------------------------------------- references (float64, loops)


def ref_pixel(s, t):
    """(t - s)^2 of the channel sums, except where s <= t <= 0; mean over pixels."""
    n, _, h, w = t.shape
    total = 0.0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                gs, gt = s[b, :, i, j].sum(), t[b, :, i, j].sum()
                if not (gs <= gt and gt <= 0):
                    total = total + (gt - gs) ** 2
    return total / (n * h * w)


def _adaptive_max_nodes(f, g):
    """(g*g, C) node vectors: max over PyTorch's adaptive bins [floor(iH/g), ceil((i+1)H/g))."""
    _, h, w = f.shape
    nodes = []
    for i in range(g):
        for j in range(g):
            r0, r1 = (i * h) // g, -(-((i + 1) * h) // g)
            c0, c1 = (j * w) // g, -(-((j + 1) * w) // g)
            nodes.append(f[:, r0:r1, c0:c1].amax(dim=(1, 2)))
    return torch.stack(nodes)


def ref_pair(s, t, g):
    total, n = 0.0, s.shape[0]
    for b in range(n):
        ns, nt = _adaptive_max_nodes(s[b], g), _adaptive_max_nodes(t[b], g)
        ns = ns / ns.norm(dim=1, keepdim=True)
        nt = nt / nt.norm(dim=1, keepdim=True)
        a_s, a_t = torch.einsum("ic,jc->ij", ns, ns), torch.einsum("ic,jc->ij", nt, nt)
        total = total + ((a_s - a_t) ** 2).sum()
    return total / (n * g ** 4)


def ref_at(s, t):
    n, _, h, w = t.shape
    total = 0.0
    for b in range(n):
        qs = (s[b] ** 2).mean(0).flatten()
        qt = (t[b] ** 2).mean(0).flatten()
        qs, qt = qs / qs.norm(), qt / qt.norm()
        total = total + ((qs - qt) ** 2).sum()
    return total / (n * h * w)


def ref_cwd(s, t, tau):
    n, c = s.shape[:2]
    total = 0.0
    for b in range(n):
        for k in range(c):
            zs, zt = s[b, k].flatten() / tau, t[b, k].flatten() / tau
            ps, pt = torch.exp(zs) / torch.exp(zs).sum(), torch.exp(zt) / torch.exp(zt).sum()
            total = total + (pt * (torch.log(pt) - torch.log(ps))).sum()
    return total * tau ** 2 / (n * c)


def _check_value_and_grad(loss_fn, ref_fn, s, t):
    s32 = s.clone().requires_grad_(True)
    value = loss_fn(s32, t)
    value.backward()
    s64 = s.double().requires_grad_(True)
    expected = ref_fn(s64, t.double())
    expected.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-7)


def test_pixelwise_preact_matches_formula_value_and_gradient():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 6, 7), torch.randn(2, 9, 6, 7)  # channel counts may differ
    _check_value_and_grad(pixelwise_preact_loss, ref_pixel, s, t)
    # the exempt region is real: some pixels have s <= t <= 0 and contribute nothing
    gs, gt = s.sum(1), t.sum(1)
    assert ((gs <= gt) & (gt <= 0)).any() and not ((gs <= gt) & (gt <= 0)).all()


def test_pixelwise_preact_resizes_the_student_to_the_teacher_grid():
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 3, 4), torch.randn(2, 6, 6, 8)
    up = F.interpolate(s.double(), size=(6, 8), mode="bilinear", align_corners=False)
    assert pixelwise_preact_loss(s, t).item() == pytest.approx(ref_pixel(up, t.double()).item(),
                                                               rel=1e-5)


def test_pairwise_similarity_matches_formula_value_and_gradient():
    torch.manual_seed(2)
    s, t = torch.randn(2, 6, 7, 10), torch.randn(2, 11, 9, 5)  # sizes and channels differ
    for grid in (3, 2):
        _check_value_and_grad(lambda a, b: pairwise_similarity_loss(a, b, grid),
                              lambda a, b: ref_pair(a, b, grid), s, t)


def test_attention_transfer_matches_formula_value_and_gradient():
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 6, 7), torch.randn(2, 8, 6, 7)
    _check_value_and_grad(attention_transfer_loss, ref_at, s, t)
    # another size: the student's map mean_c F^2 is resized before normalising
    small = torch.randn(2, 5, 3, 4)
    up = F.interpolate((small.double() ** 2).mean(1, keepdim=True), size=(6, 7),
                       mode="bilinear", align_corners=False)
    assert attention_transfer_loss(small, t).item() == pytest.approx(
        ref_at(up.sqrt(), t.double()).item(), rel=1e-5)


def test_cwd_matches_formula_value_and_gradient():
    torch.manual_seed(4)
    s, t = torch.randn(2, 4, 5, 6) * 3, torch.randn(2, 4, 5, 6) * 3
    for tau in (1.0, 4.0):
        _check_value_and_grad(lambda a, b: cwd_loss(a, b, tau), lambda a, b: ref_cwd(a, b, tau),
                              s, t)
    # the teacher at another size is resized bilinearly to the student's
    t_small = torch.randn(2, 4, 3, 3)
    t_up = F.interpolate(t_small, size=(5, 6), mode="bilinear", align_corners=False)
    assert cwd_loss(s, t_small, 4.0).item() == pytest.approx(cwd_loss(s, t_up, 4.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="channels"):
        cwd_loss(s, torch.randn(2, 3, 5, 6), 4.0)


@pytest.mark.parametrize("loss", [pixelwise_preact_loss, pairwise_similarity_loss,
                                  attention_transfer_loss, lambda a, b: cwd_loss(a, b, 4.0)])
def test_new_losses_are_zero_for_identical_inputs_and_teacher_detached(loss):
    torch.manual_seed(5)
    x = torch.randn(2, 6, 8, 8)
    assert abs(loss(x, x.clone()).item()) < 1e-6
    t = torch.randn(2, 6, 8, 8, requires_grad=True)
    s = torch.randn(2, 6, 8, 8, requires_grad=True)
    loss(s, t).backward()
    assert t.grad is None and s.grad is not None


def test_losses_stay_finite_and_float32_under_bf16_autocast():
    torch.manual_seed(6)
    s, t = torch.randn(2, 6, 16, 16), torch.randn(2, 6, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for value in (pixelwise_preact_loss(s, t), pairwise_similarity_loss(s, t),
                      attention_transfer_loss(s, t), cwd_loss(s * 50, t * 50, 1.0)):
            assert value.dtype == torch.float32 and torch.isfinite(value)


# ---------------------------------------------------------------- schedule and criterion


def test_kd_schedules_depend_on_the_epoch_alone():
    assert [kd_weight_scale(e, "constant") for e in (1, 5)] == [1.0, 1.0]
    assert [kd_weight_scale(e, "warmup", warmup_epochs=4) for e in range(1, 7)] == \
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [kd_weight_scale(e, "step", step_epoch=3) for e in range(1, 5)] == [0, 0, 1, 1]
    crit = DistillationCriterion({"kd": 0.4, "feat": 2.0, "pixel": 100, "pair": 1, "at": 1000,
                                  "cwd": 3}, schedule="warmup", warmup_epochs=2)
    assert crit.weights() == {"ce": 0.6, "kd": 0.4, "feat": 2.0, "pixel": 100, "pair": 1,
                              "at": 1000, "cwd": 3}
    crit.set_epoch(2)
    w = crit.weights()
    assert w["kd"] == pytest.approx(0.2) and w["ce"] == pytest.approx(0.8)  # CE follows alpha
    assert (w["feat"], w["pixel"], w["pair"], w["at"], w["cwd"]) == (1.0, 50, 0.5, 500, 1.5)
    crit.set_epoch(1)
    assert crit.weights()["ce"] == 1.0 and crit.weights()["pixel"] == 0.0


def test_criterion_total_with_every_term_matches_hand_sum():
    torch.manual_seed(7)
    crit = DistillationCriterion({"kd": 0.5, "feat": 1.0, "pixel": 3.0, "pair": 2.0, "at": 10.0,
                                  "cwd": 0.5}, {"tau": 2.0, "cwd_tau": 3.0})
    logits, t_logits = torch.randn(2, 5, 16, 16, requires_grad=True), torch.randn(2, 5, 8, 8)
    target = torch.randint(0, 5, (2, 16, 16))
    raw = {"low": torch.randn(2, 3, 8, 8), "mid": torch.randn(2, 4, 4, 4),
           "high": torch.randn(2, 6, 4, 4), "preact": torch.randn(2, 5, 8, 8)}
    t_feats = {"low": torch.randn(2, 7, 8, 8), "mid": torch.randn(2, 8, 4, 4),
               "high": torch.randn(2, 9, 4, 4), "preact": torch.randn(2, 10, 4, 4)}
    adapted = {k: torch.randn(2, t_feats[k].shape[1], *raw[k].shape[-2:]) for k in
               ("low", "mid", "high")}
    terms = crit(Outputs(logits, raw, adapted), target, Outputs(t_logits, t_feats))
    assert {"pixel", "pair", "at", "at_low", "at_mid", "at_high", "cwd", "kd", "feat"} <= set(terms)
    assert terms["pixel"].item() == pytest.approx(pixelwise_preact_loss(raw["preact"], t_feats["preact"]).item())
    assert terms["pair"].item() == pytest.approx(pairwise_similarity_loss(raw["high"], t_feats["high"]).item())
    at = sum(attention_transfer_loss(raw[k], t_feats[k]) for k in ("low", "mid", "high")) / 3
    assert terms["at"].item() == pytest.approx(at.item(), rel=1e-5)
    assert terms["cwd"].item() == pytest.approx(cwd_loss(logits, t_logits, 3.0).item())
    w = crit.weights()
    expected = sum(w[k] * terms[k] for k in w)
    assert crit.total(terms).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- taps


def test_student_preact_is_the_last_refinement_bn_before_relu_and_changes_nothing():
    torch.manual_seed(8)
    for variant in ("lite", "lab"):
        model = build_model(variant).eval()
        keys = list(model.state_dict())
        last_bn = [m for m in model.refine.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        seen = {}
        last_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
        x = torch.randn(2, 3, 40, 48)
        with torch.no_grad():
            plain = model(x)
            logits, feats = model(x, return_features=True, return_preact=True)
        assert torch.equal(plain, logits) and list(model.state_dict()) == keys
        assert torch.equal(feats["preact"], seen["bn"]) and (feats["preact"] < 0).any()
        assert feats["preact"].shape[1] == feature_taps(variant)["preact"][1]


@pytest.mark.parametrize("arch", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_torchvision_teacher_preact_and_logits(arch):
    torch.manual_seed(9)
    model = build_model(arch).eval()
    teacher = FrozenTeacher(model, arch, preact=True)
    x = torch.randn(1, 3, 40, 36)
    logits, feats = teacher(x)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x)["out"])
    head = model.classifier
    bn = [m for m in head.children() if isinstance(m, nn.BatchNorm2d)][-1]
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(feats["preact"], seen["bn"])
    assert (feats["preact"] < 0).any()  # really before the ReLU
    assert set(feats) == {"low", "mid", "high", "preact"}


# ---------------------------------------------------------------- training


class _TinyNet(nn.Module):
    """A few-layer stand-in with the compact student's interface (taps, 'preact'), so the
    many wiring checks below run in milliseconds; the real models are checked above and in
    the train_kd runs further down."""

    FEATURE_CHANNELS = {"low": 4, "mid": 6, "high": 8}
    # a compact model carries its taps' widths itself (a pruned one has narrower ones)
    feature_channels, preact_channels = FEATURE_CHANNELS, 5

    def __init__(self, classes=21):
        super().__init__()
        self.low = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.high = nn.Conv2d(6, 8, 3, padding=1)
        self.pre = nn.Sequential(nn.Conv2d(8, 5, 1), nn.BatchNorm2d(5))
        self.cls = nn.Conv2d(5, classes, 1)

    def forward(self, x, return_features=False, return_preact=False):
        low = F.relu(self.low(x))
        mid = F.relu(self.mid(low))
        high = F.relu(self.high(mid))
        pre = self.pre(high)
        logits = F.interpolate(self.cls(F.relu(pre)), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        feats = {"low": low, "mid": mid, "high": high}
        if return_preact:
            feats["preact"] = pre
        return (logits, feats) if return_features else logits


@pytest.fixture(scope="module")
def batch(synth_root):
    dataset = build_dataset(synth_root, "train", crop_size=32, download=False)
    torch.manual_seed(0)
    return next(iter(DataLoader(dataset, batch_size=2)))


@pytest.fixture(scope="module")
def tiny_teacher():
    torch.manual_seed(11)
    teacher = _TinyNet()
    with torch.no_grad():  # non-trivial BN statistics, to see that they never move
        teacher.pre[1].running_mean.uniform_(-1, 1)
    return FrozenTeacher(teacher, "lite", preact=True)


def _step(student, teacher, criterion, images, targets, adapters=None, steps=1, lr=1e-3,
          epoch=1):
    params = list(student.parameters()) + (list(adapters.parameters()) if adapters else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    model = Distiller(student, criterion, teacher, adapters)
    return train_one_epoch(model, criterion, optimizer, [(images, targets)] * steps,
                           torch.device("cpu"), epoch, progress=False)


class _Only(DistillationCriterion):
    """One distillation term alone (no CE), to see that training lowers exactly it."""

    def weights(self):
        return {name: w for name, w in super().weights().items() if name not in ("ce", "kd")}


@pytest.mark.parametrize("term", ["pixel", "pair", "at", "cwd"])
def test_each_method_alone_lowers_its_own_term(batch, tiny_teacher, term):
    images, targets = batch
    torch.manual_seed(12)
    student = _TinyNet()
    criterion = _Only({term: 1.0})

    def measure():
        student.train()
        with torch.no_grad():
            x, y = to_model_input(images, targets)  # what train_one_epoch feeds the nets
            t_logits, t_feats = tiny_teacher(x)
            logits, raw = student(x, return_features=True, return_preact=True)
            return criterion(Outputs(logits, raw), y, Outputs(t_logits, t_feats))[term].item()

    before = measure()
    losses = _step(student, tiny_teacher, criterion, images, targets, steps=20, lr=1e-2)
    after = measure()
    assert {k for k, w in criterion.weights().items() if w} == {term}
    assert f"loss_{term}" in losses
    assert after < 0.7 * before, (term, before, after)


def test_every_weight_combination_and_schedule_trains_one_step(batch, tiny_teacher):
    images, targets = batch
    buffers = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    torch.manual_seed(14)
    init = _TinyNet().state_dict()
    # constant: 1; warm-up half way at epoch 2: 0.5; step at 2, so epoch 1: every KD weight 0
    schedules = [("constant", {}, 2, 1.0), ("warmup", {"warmup_epochs": 2}, 2, 0.5),
                 ("step", {"step_epoch": 2}, 1, 0.0)]
    base = {"pixel": 1.0, "pair": 1.0, "at": 100.0, "cwd": 1.0}
    for on in itertools.product((False, True), repeat=4):
        weights = {k: w if flag else 0.0 for (k, w), flag in zip(base.items(), on)}
        for schedule, extra, epoch, scale in schedules:
            student = _TinyNet()
            student.load_state_dict(init)
            criterion = DistillationCriterion({"kd": 0.5, **weights}, schedule=schedule, **extra)
            assert criterion.set_epoch(epoch) == scale
            losses = _step(student, tiny_teacher, criterion, images, targets, epoch=epoch)
            assert math.isfinite(losses["loss_total"])
            for name, w in weights.items():
                assert (f"loss_{name}" in losses) == (w > 0)  # logged even when scaled to 0
            effective = criterion.weights()
            assert effective["ce"] == pytest.approx(1 - 0.5 * scale)
            assert losses["loss_total"] == pytest.approx(
                sum(w * losses[f"loss_{k}"] for k, w in effective.items() if w), rel=1e-5)
            assert any(p.grad is not None for p in student.parameters())
    for k, v in tiny_teacher.state_dict().items():  # BN running statistics included
        assert torch.equal(v, buffers[k]), k


def test_all_terms_with_lite_student_and_torchvision_teacher_never_change_it(batch):
    images, targets = batch
    torch.manual_seed(15)
    teacher = FrozenTeacher(build_model("fcn_resnet50"), "fcn_resnet50", preact=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("lite", pretrained=False)
    adapters = FeatureAdapters(student.FEATURE_CHANNELS, teacher.channels)
    criterion = DistillationCriterion({"kd": 0.5, "feat": 1.0, "pixel": 1.0, "pair": 1.0,
                                       "at": 100.0, "cwd": 1.0})
    teacher.train()
    losses = _step(student, teacher, criterion, images, targets, adapters=adapters)
    assert {"loss_pixel", "loss_pair", "loss_at", "loss_cwd", "loss_kd", "loss_feat"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in adapters.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def _train_args(root, tmp_path, *extra):
    return train_kd.get_args_parser().parse_args(train_flags(
        root, tmp_path, "--epochs", "2", "--batch-size", "2", "--crop-size", "32",
        "--limit-train", "2", "--limit-val", "1", "--teacher", "lite", "--teacher-weights",
        "none", *extra))


def test_train_kd_logs_every_term_and_the_scheduled_weights_and_resumes(synth_root, tmp_path):
    flags = ["--alpha", "0.5", "--w-pixel", "1", "--w-pair", "1", "--w-at", "100", "--w-cwd",
             "1", "--kd-schedule", "warmup", "--kd-warmup-epochs", "2"]
    train_kd.main(_train_args(synth_root, tmp_path, "--out", "full", *flags, "--epochs", "1"))
    records = [json.loads(x) for x in (tmp_path / "outputs/full/history.jsonl").read_text().splitlines()]
    for term in ("pixel", "pair", "at", "at_low", "at_mid", "at_high", "cwd", "kd", "ce", "total"):
        assert f"loss_{term}" in records[0]
    assert records[0]["weights"] == {"ce": 1.0, "kd": 0.0, "feat": 0.0, "pixel": 0.0, "pair": 0.0,
                                     "at": 0.0, "cwd": 0.0}
    # a resumed run gets the same weights: they depend on the epoch number alone
    train_kd.main(_train_args(synth_root, tmp_path, "--out", "full", *flags, "--epochs", "2",
                              "--resume", str(tmp_path / "models/full_last.pth")))
    records = [json.loads(x) for x in (tmp_path / "outputs/full/history.jsonl").read_text().splitlines()]
    assert [r["weights"]["pixel"] for r in records] == [0.0, 0.5]
    assert [r["weights"]["ce"] for r in records] == [1.0, 0.75]
    assert records[1]["weights"]["kd"] == 0.25 and records[1]["weights"]["at"] == 50.0
    for r in records:
        assert r["loss_total"] == pytest.approx(
            sum(w * r[f"loss_{k}"] for k, w in r["weights"].items() if w), rel=1e-4)


def test_resume_records_the_backbone_of_the_runs_first_start(synth_root, tmp_path, capsys):
    """A run started from random weights stays recorded as such when the resuming command
    omits --no-pretrained-backbone (its backbone comes from the checkpoint)."""
    train_kd.main(_train_args(synth_root, tmp_path, "--out", "rand", "--epochs", "1"))
    args = _train_args(synth_root, tmp_path, "--out", "rand", "--resume", "auto")
    args.pretrained_backbone = True  # the flag left out
    summary = train_kd.main(args)
    assert summary["pretrained_backbone"] is False and summary["args"]["pretrained_backbone"] is False
    assert "--pretrained-backbone false -> true" in capsys.readouterr().out
    saved = torch.load(tmp_path / "models/rand_last.pth", weights_only=True)
    assert saved["args"]["pretrained_backbone"] is False


def test_lraspp_student_refuses_feature_terms_and_trains_with_logit_terms(synth_root, tmp_path):
    for flag in ("--w-pixel", "--w-pair", "--w-at", "--beta"):
        with pytest.raises(UserError, match=f"{flag} needs feature taps.*lraspp_mobilenet_v3_large"):
            train_kd.main(_train_args(synth_root, tmp_path, "--out", "bad", "--student",
                                      "lraspp_mobilenet_v3_large", flag, "1"))
    train_kd.main(_train_args(synth_root, tmp_path, "--out", "lr", "--epochs", "1", "--student",
                              "lraspp_mobilenet_v3_large", "--alpha", "0.5", "--w-cwd", "1"))
    record = json.loads((tmp_path / "outputs/lr/history.jsonl").read_text().splitlines()[0])
    assert {"loss_ce", "loss_kd", "loss_cwd"} <= set(record)
    ckpt_path = tmp_path / "models/lr_best.pth"
    model, ckpt = model_from_checkpoint(ckpt_path)
    assert ckpt["model_args"] == {"arch": "lraspp_mobilenet_v3_large", "num_classes": 21}
    out = tmp_path / "lr_eval.json"
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--model_path", str(ckpt_path), "--data-root", str(synth_root), "--device", "cpu",
        "--workers", "0", "--limit", "2", "--json", str(out), "--no-download",
        "--output-dir", str(tmp_path / "outputs")]))
    assert json.loads(out.read_text())["params"] == sum(p.numel() for p in model.parameters())


def test_benchmark_train_cost_times_both_configurations(tmp_path):
    import benchmark
    out = tmp_path / "cost.json"
    benchmark.main(benchmark.get_args_parser().parse_args([
        "--train-cost", "--size", "32", "--runs", "3", "--warmup", "0", "--device", "cpu",
        "--train-cost-json", str(out)]))
    result = json.loads(out.read_text())
    times = result["times_ms"]
    assert set(times) == {"hinton", "all_terms"} and all(len(t) == 3 for t in times.values())
    assert all(v > 0 for t in times.values() for v in t)
    for name, t in times.items():  # the summary is computed from the recorded steps
        assert result["median_ms"][name] == pytest.approx(statistics.median(t))
    assert result["ratio"] == pytest.approx(
        statistics.median(times["all_terms"]) / statistics.median(times["hinton"]))
    assert result["paired_ratio"] == pytest.approx(
        statistics.median(a / h for a, h in zip(times["all_terms"], times["hinton"])))


def test_a_new_term_is_one_function_and_one_row(synth_root, tmp_path, monkeypatch, capsys):
    """Adding a distillation term touches nothing but losses.TERMS: here a toy L1 term on
    the logits, registered from this test alone, gets its flag, its range check, its weight,
    its teacher, its logged key, and trains."""
    import losses
    from checkpoints import read_history

    def l1_logits(student, teacher, params):
        """mean |z_s - z_t| over classes and pixels (a toy, not a method)"""
        return (student.logits - teacher.logits.detach()).abs().mean()

    monkeypatch.setitem(losses.TERMS, "toy", losses.Term(
        l1_logits, frozenset(), cli.Option(("--w-toy",), 0.0, "weight of the toy term")))
    parser = train_kd.get_args_parser()
    assert "--w-toy" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(train_flags(synth_root, tmp_path, "--w-toy", "-1"))
    assert "argument --w-toy" in capsys.readouterr().err
    summary = train_kd.main(_train_args(synth_root, tmp_path, "--out", "toy", "--w-toy", "2",
                                        "--epochs", "1"))
    assert summary["teacher"] == "lite"  # the teacher was built for the new term alone
    record = read_history(tmp_path / "outputs/toy/history.jsonl")[0]
    assert record["weights"]["toy"] == 2.0 and record["weights"]["ce"] == 1.0
    assert record["loss_toy"] > 0
    assert record["loss_total"] == pytest.approx(record["loss_ce"] + 2 * record["loss_toy"],
                                                 rel=1e-5)
