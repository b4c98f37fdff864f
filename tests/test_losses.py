"""Tests of losses.py: each loss against its formula written out independently (float64,
explicit softmax / norms / loops), invariances, the batchmean pitfall, AMP, the criterion."""
import argparse
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import (DistillationCriterion, Outputs,  # noqa: E402
                    add_term_flags, cosine_feature_loss, cross_entropy_loss,
                    hinton_kd_loss)

IGNORE = 255


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- references
def ref_ce(logits, target):
    """Mean over non-void pixels of -log softmax(z)[y], by an explicit loop."""
    z = logits.detach().double()
    total, count = 0.0, 0
    n, _, h, w = z.shape
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(target[b, i, j])
                if y == IGNORE:
                    continue
                v = z[b, :, i, j]
                log_probs = v - torch.log(torch.exp(v - v.max()).sum()) - v.max()
                total -= float(log_probs[y])
                count += 1
    return total / count


def ref_kd(student, teacher, tau):
    """tau^2 * mean over pixels of sum_c p_t * log(p_t / p_s), explicit loop."""
    s, t = student.detach().double(), teacher.detach().double()
    n, _, h, w = s.shape
    total, count = 0.0, 0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                es = torch.exp(s[b, :, i, j] / tau)
                et = torch.exp(t[b, :, i, j] / tau)
                p_s, p_t = es / es.sum(), et / et.sum()
                total += float((p_t * (torch.log(p_t) - torch.log(p_s))).sum())
                count += 1
    return tau ** 2 * total / count


def ref_cos(student, teacher):
    """Mean over pixels of 1 - <s, t> / (|s| |t|), student already at the teacher's size."""
    s, t = student.detach().double(), teacher.detach().double()
    dot = (s * t).sum(dim=1)
    norms = s.pow(2).sum(dim=1).sqrt() * t.pow(2).sum(dim=1).sqrt()
    return float((1.0 - dot / norms).mean())


# ----------------------------------------------------------------------------- cross-entropy
def test_ce_matches_manual_log_softmax_and_skips_void():
    logits = torch.randn(2, 5, 3, 4) * 3
    target = torch.randint(0, 5, (2, 3, 4))
    target[0, 0, :] = IGNORE
    target[1, 2, 1] = IGNORE
    got = cross_entropy_loss(logits, target)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(ref_ce(logits, target), rel=1e-5)


def test_ce_ignores_logits_at_void_pixels():
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    void = torch.rand(2, 5, 5) < 0.4
    target[void] = IGNORE
    before = cross_entropy_loss(logits, target)
    changed = logits.clone()
    changed.permute(0, 2, 3, 1)[void] = torch.randn(int(void.sum()), 4) * 100
    after = cross_entropy_loss(changed, target)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)
    # ...while changing a non-void pixel does change it
    valid = torch.nonzero(~void)[0]
    changed[valid[0], :, valid[1], valid[2]] += torch.arange(4.0) * 10
    assert cross_entropy_loss(changed, target).item() != pytest.approx(before.item(), rel=1e-6)


def test_ce_all_void_is_zero_with_grad():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    loss = cross_entropy_loss(logits, target)
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ----------------------------------------------------------------------------- Hinton KD
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_matches_formula(tau):
    s = torch.randn(2, 5, 3, 4) * 2
    t = torch.randn(2, 5, 3, 4) * 2
    got = hinton_kd_loss(s, t, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_kd(s, t, tau), rel=1e-4)


def test_kd_zero_for_equal_and_positive_otherwise():
    s = torch.randn(2, 6, 4, 4)
    assert hinton_kd_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # a per-pixel constant shift of the logits leaves the softmax unchanged
    assert hinton_kd_loss(s, s + 3.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    assert hinton_kd_loss(s, torch.randn(2, 6, 4, 4), 4.0).item() > 1e-4


def test_kd_does_not_grow_with_image_size():
    s = torch.randn(2, 5, 3, 3)
    t = torch.randn(2, 5, 3, 3)
    small = hinton_kd_loss(s, t, 2.0)
    big = hinton_kd_loss(s.repeat(1, 1, 2, 2), t.repeat(1, 1, 2, 2), 2.0)
    assert big.item() == pytest.approx(small.item(), rel=1e-5)
    # nor with the batch size
    assert hinton_kd_loss(s.repeat(3, 1, 1, 1), t.repeat(3, 1, 1, 1), 2.0).item() == \
        pytest.approx(small.item(), rel=1e-5)


def test_kd_resizes_teacher_to_student_size():
    s = torch.randn(1, 4, 6, 8)
    t = torch.randn(1, 4, 3, 4)
    t_up = F.interpolate(t, size=(6, 8), mode="bilinear", align_corners=False)
    assert hinton_kd_loss(s, t, 2.0).item() == pytest.approx(ref_kd(s, t_up, 2.0), rel=1e-4)


def test_kd_tau_squared_keeps_gradient_scale():
    t = torch.randn(2, 5, 4, 4)
    base = torch.randn(2, 5, 4, 4)
    norms = {}
    for tau in (10.0, 40.0):
        s = base.clone().requires_grad_(True)
        hinton_kd_loss(s, t, tau).backward()
        norms[tau] = s.grad.norm().item()
    # with tau^2 the high-tau gradient is ~tau-independent; without it it would shrink 16x
    assert 0.5 < norms[10.0] / norms[40.0] < 2.0


def test_kd_is_float32_and_finite_under_bf16_autocast():
    s = (torch.randn(2, 21, 8, 8) * 30).bfloat16().requires_grad_(True)
    t = (torch.randn(2, 21, 8, 8) * 30).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hinton_kd_loss(s, t, 20.0)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    # computed in float32: equals the float32 value of the same (bf16-rounded) inputs
    ref = hinton_kd_loss(s.detach().float(), t.float(), 20.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad.float()).all()


def test_kd_rejects_bad_input():
    s = torch.randn(1, 3, 2, 2)
    with pytest.raises(ValueError, match="classes"):
        hinton_kd_loss(s, torch.randn(1, 4, 2, 2), 1.0)


# ----------------------------------------------------------------------------- cosine feature
def test_cosine_matches_formula_same_size():
    s = torch.randn(2, 8, 4, 5)
    t = torch.randn(2, 8, 4, 5)
    got = cosine_feature_loss(s, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_cos(s, t), rel=1e-5)


def test_cosine_zero_for_identical_and_scaled_features():
    f = torch.randn(2, 8, 4, 4)
    assert cosine_feature_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_feature_loss(3.7 * f, f).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_feature_loss(-f, f).item() == pytest.approx(2.0, abs=1e-6)


def test_cosine_resizes_student_to_teacher_grid():
    s = torch.randn(2, 6, 8, 10)  # student at twice the teacher's resolution
    t = torch.randn(2, 6, 4, 5)
    got = cosine_feature_loss(s, t)
    s_down = F.interpolate(s, size=(4, 5), mode="bilinear", align_corners=False)
    assert got.item() == pytest.approx(ref_cos(s_down, t), rel=1e-5)
    # and a smaller student is upsampled
    small = torch.randn(2, 6, 2, 3)
    s_up = F.interpolate(small, size=(4, 5), mode="bilinear", align_corners=False)
    assert cosine_feature_loss(small, t).item() == pytest.approx(ref_cos(s_up, t), rel=1e-5)


def test_cosine_channel_mismatch_raises():
    with pytest.raises(ValueError, match="channels"):
        cosine_feature_loss(torch.randn(1, 4, 3, 3), torch.randn(1, 5, 3, 3))


# ----------------------------------------------------------------------------- criterion
def _batch(n=2, c=5, h=8, w=8):
    logits = torch.randn(n, c, h, w, requires_grad=True)
    target = torch.randint(0, c, (n, h, w))
    target[:, 0, :] = IGNORE
    return logits, target


def _feats(n=2):
    # student taps (after adapters) at 2x the teacher's size; teacher taps without grad
    shapes = {"low": (4, 8, 8), "mid": (6, 4, 4), "high": (8, 2, 2)}
    sf = {k: torch.randn(n, c, 2 * h, 2 * w, requires_grad=True) for k, (c, h, w) in shapes.items()}
    tf = {k: torch.randn(n, c, h, w) for k, (c, h, w) in shapes.items()}
    return sf, tf


def _outputs(logits, teacher=None, sf=None, tf=None):
    """The criterion's inputs: student Outputs (adapted taps ``sf``) and teacher Outputs."""
    student = Outputs(logits, taps=None, adapted=sf)
    return student, (Outputs(teacher, taps=tf) if teacher is not None or tf is not None else None)


def test_criterion_plain_ce_needs_no_teacher():
    crit = DistillationCriterion()
    logits, target = _batch()
    terms = crit(Outputs(logits), target)
    assert set(terms) == {"ce"} and crit.needs() == set() and crit.active() == []
    assert crit.total(terms).item() == pytest.approx(ref_ce(logits, target), rel=1e-5)


def test_criterion_total_matches_hand_computation():
    alpha, beta, tau = 0.3, 0.5, 4.0
    crit = DistillationCriterion({"kd": alpha, "feat": beta}, {"tau": tau})
    assert crit.weights() == {"ce": 1 - alpha, "kd": alpha, "feat": beta, "pixel": 0.0,
                              "pair": 0.0, "at": 0.0, "cwd": 0.0}
    logits, target = _batch()
    teacher = torch.randn(2, 5, 4, 4) * 2  # lower resolution than the student
    sf, tf = _feats()
    student, teacher_out = _outputs(logits, teacher, sf, tf)
    terms = crit(student, target, teacher_out)
    assert set(terms) == {"ce", "kd", "feat", "feat_low", "feat_mid", "feat_high"}

    ce = ref_ce(logits, target)
    kd = ref_kd(logits, F.interpolate(teacher, size=(8, 8), mode="bilinear",
                                      align_corners=False), tau)
    taps = {k: ref_cos(F.interpolate(sf[k].detach(), size=tf[k].shape[-2:], mode="bilinear",
                                     align_corners=False), tf[k]) for k in sf}
    feat = sum(taps.values()) / 3
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-4)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-4)
    for k, v in taps.items():
        assert terms[f"feat_{k}"].item() == pytest.approx(v, rel=1e-4)
    assert terms["feat"].item() == pytest.approx(feat, rel=1e-4)
    expected = (1 - alpha) * ce + alpha * kd + beta * feat  # per-tap entries not added
    assert crit.total(terms).item() == pytest.approx(expected, rel=1e-4)


def test_criterion_gradients_reach_student_not_teacher():
    crit = DistillationCriterion({"kd": 0.5, "feat": 1.0}, {"tau": 2.0})
    logits, target = _batch()
    teacher = torch.randn(2, 5, 8, 8)  # as produced under torch.no_grad()
    sf, tf = _feats()
    student, t_out = _outputs(logits, teacher, sf, tf)
    crit.total(crit(student, target, t_out)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    for k in sf:
        assert sf[k].grad is not None and sf[k].grad.abs().sum() > 0
        assert not tf[k].requires_grad and tf[k].grad is None
    assert not teacher.requires_grad and teacher.grad is None


def test_criterion_detaches_teacher_even_if_it_requires_grad():
    crit = DistillationCriterion({"kd": 0.5, "feat": 1.0})
    logits, target = _batch()
    teacher = torch.randn(2, 5, 8, 8, requires_grad=True)
    sf, tf = _feats()
    tf = {k: v.requires_grad_(True) for k, v in tf.items()}
    student, teacher_out = _outputs(logits, teacher, sf, tf)
    crit.total(crit(student, target, teacher_out)).backward()
    assert teacher.grad is None
    assert all(v.grad is None for v in tf.values())
    assert logits.grad is not None


def test_criterion_alpha_one_uses_only_kd():
    """At alpha = 1 CE gets weight 0: the total is exactly KD, on a batch whose CE is far
    from 0 (a CE weight that is not 1 - alpha shows)."""
    crit = DistillationCriterion({"kd": 1.0}, {"tau": 1.0})
    logits, target = _batch()
    teacher = torch.randn(2, 5, 8, 8)
    terms = crit(Outputs(logits), target, Outputs(teacher))
    assert set(terms) == {"ce", "kd"} and terms["ce"].item() > 0.5
    assert crit.weights()["ce"] == 0.0
    assert crit.total(terms).item() == pytest.approx(terms["kd"].item(), rel=1e-6)
    half = DistillationCriterion({"kd": 0.25}, {"tau": 1.0})
    assert half.total(terms).item() == pytest.approx(
        0.75 * terms["ce"].item() + 0.25 * terms["kd"].item(), rel=1e-6)


@pytest.mark.parametrize("flags", [["--alpha", "-0.1"], ["--alpha", "1.5"], ["--alpha", "nan"],
                                   ["--beta", "-1"], ["--tau", "0"], ["--tau", "-2"],
                                   ["--w-cwd", "-1"], ["--cwd-tau", "0"], ["--w-at", "inf"]])
def test_out_of_range_flags_are_refused_by_the_parser(flags, capsys):
    """Ranges are checked once, where the numbers enter: the table's flags (losses.TERMS)."""
    parser = argparse.ArgumentParser()
    add_term_flags(parser)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}" in err and "out of range" in err


def test_criterion_missing_teacher_inputs_raise():
    logits, target = _batch()
    with pytest.raises(ValueError, match="teacher"):
        DistillationCriterion({"kd": 0.5})(Outputs(logits), target)
    sf, tf = _feats()
    del tf["high"]
    with pytest.raises(KeyError, match="high"):
        DistillationCriterion({"feat": 1.0})(Outputs(logits, adapted=sf), target,
                                             Outputs(None, taps=tf))
    with pytest.raises(KeyError):
        DistillationCriterion({"kd": 0.5}).total({"ce": torch.tensor(1.0)})
    with pytest.raises(KeyError, match="unknown distillation terms"):
        DistillationCriterion({"kdd": 0.5})
