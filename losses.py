"""Losses for training and distilling the segmentation student.

The project's training objective (alpha, beta, tau set by ``DistillationCriterion``):

    L = (1 - alpha) * CE(y, z_s) + alpha * KD_tau(z_t, z_s) + beta * mean_taps(1 - cos(f_s, f_t))

    CE        pixel-wise cross-entropy with the ground truth, void pixels (255) ignored
    KD_tau    tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over pixels
    1 - cos   one minus the cosine similarity of adapted student and teacher features
              at each pixel, averaged over pixels, then over the feature taps

Mapping to the lab handout's notation

    L = alpha_lab * H(y, sigma(z_s)) + beta_lab * H(sigma(z_t; tau), sigma(z_s; tau))

is alpha_lab = 1 - alpha and beta_lab = alpha.  The handout writes the soft term as a
cross-entropy; it differs from the KL used here only by the teacher's entropy, a constant
with respect to the student, so both give the same gradients.  Our KD term also carries
the tau^2 factor of Hinton et al. (2015): the soft-target gradients scale as 1/tau^2, and
multiplying by tau^2 keeps them on the scale of the hard-label ones when tau changes.

Every loss is a small function; ``DistillationCriterion`` computes a dict of unweighted,
named terms (``forward``), keeps the weights in one place (``weights``) and sums them in one
place (``total``).  To add a term: compute it in ``forward`` under a new key and give that
key a weight in ``weights``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from data import IGNORE_INDEX


def _check_4d(name, x):
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (N, C, H, W); got shape {tuple(x.shape)}")


def cross_entropy_loss(logits, target):
    """Pixel-wise cross-entropy, mean over the pixels whose label is not IGNORE_INDEX (255).

    CE = -1/|V| * sum_{i in V} log softmax(z_i)[y_i], V = {i : y_i != 255}
    (standard softmax cross-entropy; e.g. Long et al. 2015, "Fully Convolutional Networks").
    Computed in float32.  If every pixel is void the loss is 0 (not NaN), still connected
    to ``logits`` so that ``backward`` works (with zero gradients).

    logits: (N, C, H, W) float; target: (N, H, W) integer labels in [0, C) or 255.
    """
    target = target.long()
    summed = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    n_valid = (target != IGNORE_INDEX).sum().clamp_min(1)
    return summed / n_valid


def hinton_kd_loss(student_logits, teacher_logits, tau, mask=None):
    """Soft-target distillation loss of Hinton et al. (2015), "Distilling the Knowledge in a
    Neural Network": tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)).

    The KL divergence is summed over classes at each pixel and averaged over the pixels
    (N*H*W; or over the pixels where ``mask`` is True), so the value does not grow with the
    image size.  Computed in float32 with autocast disabled, so it stays finite under
    bf16/fp16 AMP even for large tau.  The teacher is a fixed target: its logits are detached.
    If the teacher's logits have another spatial size than the student's, they are first
    resized bilinearly (align_corners=False) to the student's size.

    student_logits, teacher_logits: (N, C, H, W) (teacher may have another H, W);
    tau: temperature > 0; mask: optional bool (N, H, W) at the student's size.
    """
    _check_4d("student_logits", student_logits)
    _check_4d("teacher_logits", teacher_logits)
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(f"student and teacher logits must have the same batch size and number "
                         f"of classes; got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.float()
        t = teacher_logits.detach().float()
        if t.shape[-2:] != s.shape[-2:]:
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        log_p_s = F.log_softmax(s / tau, dim=1)
        log_p_t = F.log_softmax(t / tau, dim=1)
        # per-pixel KL(p_t || p_s) = sum_c p_t * (log p_t - log p_s), shape (N, H, W)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        if mask is None:
            kl = kl.mean()
        else:
            if mask.shape != kl.shape:
                raise ValueError(f"mask must have shape (N, H, W) = {tuple(kl.shape)} (the "
                                 f"student's size); got {tuple(mask.shape)}")
            mask = mask.to(device=kl.device, dtype=torch.bool)
            kl = (kl * mask).sum() / mask.sum().clamp_min(1)
        return kl * (tau * tau)


def cosine_feature_loss(student_feat, teacher_feat):
    """Feature-matching loss: 1 - cosine similarity over channels, averaged over pixels.

    L = 1/(N*H*W) * sum_i (1 - <f_s(i), f_t(i)> / (||f_s(i)|| * ||f_t(i)||)), a cosine form of
    the hint loss of FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").
    The student feature (already through its 1x1 adapter, so with the teacher's channel
    count) is resized bilinearly (align_corners=False) to the teacher's H, W.  Computed in
    float32 with autocast disabled; the teacher feature is a fixed target (detached).
    Insensitive to a positive scale of either feature.

    student_feat: (N, C, h, w); teacher_feat: (N, C, H, W).
    """
    _check_4d("student_feat", student_feat)
    _check_4d("teacher_feat", teacher_feat)
    if student_feat.shape[1] != teacher_feat.shape[1]:
        raise ValueError(f"student and teacher features must have the same number of channels "
                         f"(pass the student feature through its 1x1 adapter first); got "
                         f"{student_feat.shape[1]} and {teacher_feat.shape[1]}")
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"student and teacher features must have the same batch size; got "
                         f"{student_feat.shape[0]} and {teacher_feat.shape[0]}")
    with torch.autocast(device_type=student_feat.device.type, enabled=False):
        s = student_feat.float()
        t = teacher_feat.detach().float()
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        cos = F.cosine_similarity(s, t, dim=1, eps=1e-8)  # (N, H, W)
        return (1.0 - cos).mean()


class DistillationCriterion(nn.Module):
    """L = (1 - alpha) * CE + alpha * KD_tau + beta * mean_taps(1 - cos).

    ``forward`` returns a dict of UNWEIGHTED terms: 'ce' always; 'kd' when alpha > 0;
    'feat' (mean over taps) when beta > 0, plus 'feat_<tap>' per tap for logging only.
    ``weights()`` gives the weight of each summed term and ``total(terms)`` the weighted sum.
    With alpha = beta = 0 (plain supervised training) no teacher input is needed.
    """

    def __init__(self, alpha=0.0, beta=0.0, tau=4.0):
        super().__init__()
        alpha, beta, tau = float(alpha), float(beta), float(tau)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (weight of the KD term) must be in [0, 1], got {alpha}")
        if not (beta >= 0.0 and math.isfinite(beta)):
            raise ValueError(f"beta (weight of the feature term) must be a finite number >= 0, "
                             f"got {beta}")
        if not (tau > 0.0 and math.isfinite(tau)):
            raise ValueError(f"tau (KD temperature) must be a finite number > 0, got {tau}")
        self.alpha, self.beta, self.tau = alpha, beta, tau

    def extra_repr(self):
        return f"alpha={self.alpha}, beta={self.beta}, tau={self.tau}"

    def weights(self):
        """Weight of each term that ``total`` sums; the one place where weights are set."""
        return {"ce": 1.0 - self.alpha, "kd": self.alpha, "feat": self.beta}

    def forward(self, student_logits, target, teacher_logits=None, student_feats=None,
                teacher_feats=None):
        """Unweighted named loss terms (dict of scalar tensors); see the class docstring.

        student_feats / teacher_feats: dicts tap name -> (N, C, H, W) with the same keys
        (e.g. 'low', 'mid', 'high'); the student's already adapted to the teacher's channels.
        """
        terms = {"ce": cross_entropy_loss(student_logits, target)}
        if self.alpha > 0:
            if teacher_logits is None:
                raise ValueError(f"alpha={self.alpha} > 0 needs teacher_logits")
            terms["kd"] = hinton_kd_loss(student_logits, teacher_logits, self.tau)
        if self.beta > 0:
            if not student_feats or not teacher_feats:
                raise ValueError(f"beta={self.beta} > 0 needs non-empty student_feats and "
                                 f"teacher_feats dicts")
            if set(student_feats) != set(teacher_feats):
                raise ValueError(f"student_feats and teacher_feats must have the same taps; got "
                                 f"{sorted(student_feats)} and {sorted(teacher_feats)}")
            per_tap = []
            for name in student_feats:
                term = cosine_feature_loss(student_feats[name], teacher_feats[name])
                terms[f"feat_{name}"] = term
                per_tap.append(term)
            terms["feat"] = torch.stack(per_tap).mean()
        return terms

    def total(self, terms):
        """Weighted sum of the terms that have a weight (per-tap entries are not added).

        Terms with weight 0 are skipped.  A term with a nonzero weight that is missing from
        ``terms`` raises KeyError (it would otherwise be silently dropped).
        """
        total = None
        for name, weight in self.weights().items():
            if weight == 0:
                continue
            if name not in terms:
                raise KeyError(f"loss term {name!r} has weight {weight} but is missing from "
                               f"terms {sorted(terms)}")
            total = weight * terms[name] if total is None else total + weight * terms[name]
        return total
