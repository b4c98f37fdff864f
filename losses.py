"""Losses for training and distilling the segmentation student.

The project's training objective (alpha, beta, tau set by ``DistillationCriterion``):

    L = (1 - alpha) * CE(y, z_s) + alpha * KD_tau(z_t, z_s) + beta * mean_taps(1 - cos(f_s, f_t))

    CE        pixel-wise cross-entropy with the ground truth, void pixels (255) ignored
    KD_tau    tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over pixels
    1 - cos   one minus the cosine similarity of adapted student and teacher features
              at each pixel, averaged over pixels, then over the feature taps

Further terms (weights pixel, pair, at, cwd; see each function): the pixel-wise
pre-activation loss and the pair-wise similarity loss of the seed paper, attention transfer
and channel-wise distillation. A progressive schedule (``kd_weight_scale``) scales every
distillation weight per epoch; CE always gets 1 - the effective alpha.

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


def _check_pair(s_name, s, t_name, t):
    _check_4d(s_name, s)
    _check_4d(t_name, t)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{s_name} and {t_name} must have the same batch size; got "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")


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


def _align(teacher, student):
    """The teacher's map, detached, in float32, resized bilinearly to the student's H, W."""
    t = teacher.detach().float()
    if t.shape[-2:] != student.shape[-2:]:
        t = F.interpolate(t, size=student.shape[-2:], mode="bilinear", align_corners=False)
    return t


def _tempered_kl(student, teacher, tau, dim):
    """KL(softmax(t/tau) || softmax(s/tau)) along ``dim``, in float32 (call with autocast off)."""
    log_p_s = F.log_softmax(student.float() / tau, dim=dim)
    log_p_t = F.log_softmax(teacher.float() / tau, dim=dim)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=dim)


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
        # per-pixel KL over the classes, shape (N, H, W)
        kl = _tempered_kl(student_logits, _align(teacher_logits, student_logits), tau, dim=1)
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


def pixelwise_preact_loss(student_feat, teacher_feat):
    """Pixel-wise pre-activation distillation, the seed paper's L_pi, with the partial L2
    distance of Heo et al. (2019), "A Comprehensive Overhaul of Feature Distillation".

        G(F) = sum_c F_c                     (attention map, p = 1, sign kept), (N, 1, H, W)
        L = 1/(N*H*W) * sum_i m_i * (G_t(i) - G_s(i))^2,  m_i = 0 where G_s(i) <= G_t(i) <= 0

    F are PRE-ReLU features of the last layer before the classifier. Where the teacher's value
    is negative (the ReLU would zero it) a student below it is not penalised. Normalisation:
    the mean over the N*H*W pixels of the teacher's grid; the map is a SUM over channels, so
    the value grows with the channel counts (no adapter is needed: they may differ). The
    student's map is resized bilinearly (align_corners=False) to the teacher's H, W (summing
    and resizing commute, so the cheap 1-channel map is resized). float32, autocast off;
    the teacher is a fixed target (detached).

    student_feat: (N, Cs, h, w); teacher_feat: (N, Ct, H, W).
    """
    _check_pair("student_feat", student_feat, "teacher_feat", teacher_feat)
    with torch.autocast(device_type=student_feat.device.type, enabled=False):
        s = student_feat.float().sum(dim=1, keepdim=True)
        t = teacher_feat.detach().float().sum(dim=1, keepdim=True)
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        penalised = ~((s <= t) & (t <= 0))
        return ((t - s).square() * penalised).mean()


def _node_affinity(feat, grid):
    """(N, g^2, g^2) cosine affinity of the g x g max-pooled nodes of ``feat``."""
    nodes = F.adaptive_max_pool2d(feat, grid).flatten(2).transpose(1, 2)  # (N, g^2, C)
    nodes = F.normalize(nodes, p=2, dim=2, eps=1e-12)
    return nodes @ nodes.transpose(1, 2)


def pairwise_similarity_loss(student_feat, teacher_feat, grid=3):
    """Pair-wise similarity distillation, the seed paper's L_pa, after Liu et al. (2019),
    "Structured Knowledge Distillation for Semantic Segmentation" (SKD).

        f_i = adaptive max-pool of F to grid x grid nodes, f^_i = f_i / ||f_i||_2
        a_ij = f^_i . f^_j   (N, g^2, g^2);   L = 1/(N*g^4) * sum (a^s_ij - a^t_ij)^2

    The affinity is between pooled nodes, never between all H*W pixels (memory stays
    O(g^4)). Channels may differ (each map is compared with itself): no adapter. float32,
    autocast off; the teacher is detached.

    student_feat: (N, Cs, h, w); teacher_feat: (N, Ct, H, W); grid: nodes per side.
    """
    _check_pair("student_feat", student_feat, "teacher_feat", teacher_feat)
    with torch.autocast(device_type=student_feat.device.type, enabled=False):
        a_s = _node_affinity(student_feat.float(), grid)
        a_t = _node_affinity(teacher_feat.detach().float(), grid)
        return (a_s - a_t).square().mean()


def _attention_map(feat, size):
    a = feat.float().square().mean(dim=1, keepdim=True)  # (N, 1, h, w)
    if a.shape[-2:] != size:
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    return F.normalize(a.flatten(1), p=2, dim=1, eps=1e-12)


def attention_transfer_loss(student_feat, teacher_feat):
    """Attention transfer of Zagoruyko & Komodakis (2017), "Paying More Attention to
    Attention".

        q(F) = vec(mean_c F_c^2) / ||vec(mean_c F_c^2)||_2     (per sample, over H*W)
        L = 1/(N*H*W) * sum_{n,i} (q_s(n, i) - q_t(n, i))^2

    i.e. the MEAN over the N*H*W entries (torchdistill's reduction); per sample this is
    ||q_s - q_t||^2 / (H*W), so the value shrinks as the map grows (hence weights ~1e3).
    The student's map mean_c F^2 is resized bilinearly to the teacher's H, W before the
    normalisation; channels may differ. float32, autocast off; the teacher is detached.

    student_feat: (N, Cs, h, w); teacher_feat: (N, Ct, H, W).
    """
    _check_pair("student_feat", student_feat, "teacher_feat", teacher_feat)
    with torch.autocast(device_type=student_feat.device.type, enabled=False):
        size = teacher_feat.shape[-2:]
        q_s = _attention_map(student_feat, size)
        q_t = _attention_map(teacher_feat.detach(), size)
        return (q_s - q_t).square().mean()


def cwd_loss(student_logits, teacher_logits, tau):
    """Channel-wise distillation of Shu et al. (2021), "Channel-wise Knowledge Distillation
    for Dense Prediction" (CWD).

        p_c = softmax over the H*W positions of z_c / tau, for each sample and channel c
        L = tau^2 / (N*C) * sum_{n,c} sum_i p^t_c(i) * (log p^t_c(i) - log p^s_c(i))

    KL(teacher || student) summed over positions, normalised by N*C (not by H*W). The
    teacher's map is resized bilinearly to the student's H, W first (the student's logits
    are full size). Works on any (N, C, H, W) pair with equal C: logits, or features
    through an adapter. float32, autocast off; the teacher is detached.
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(f"cwd_loss needs the same number of channels; got "
                         f"{student_logits.shape[1]} and {teacher_logits.shape[1]} (map the "
                         f"student's channels through an adapter first)")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        # per-channel KL over the H*W positions, shape (N, C)
        t = _align(teacher_logits, student_logits)
        kl = _tempered_kl(student_logits.flatten(2), t.flatten(2), tau, dim=2)
        return kl.mean() * (tau * tau)


KD_SCHEDULES = ("constant", "warmup", "step")


def kd_weight_scale(epoch, schedule="constant", warmup_epochs=0, step_epoch=1):
    """Factor in [0, 1] applied to EVERY distillation weight at ``epoch`` (1-based).

    constant: 1.  warmup: (epoch - 1) / warmup_epochs up to 1, a linear ramp from 0 at
    epoch 1 to full weight at epoch warmup_epochs + 1.  step: 0 before ``step_epoch``, 1 from
    it on (train on the labels first, then distil).  A function of the epoch alone, so a
    resumed run gets the same weights as an unbroken one.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "warmup":
        if warmup_epochs <= 0:
            return 1.0
        return min(1.0, max(0.0, (epoch - 1) / warmup_epochs))
    if schedule == "step":
        return 1.0 if epoch >= step_epoch else 0.0
    raise ValueError(f"unknown KD schedule {schedule!r}; choose one of {', '.join(KD_SCHEDULES)}")


class DistillationCriterion(nn.Module):
    """L = (1 - a) * CE + a * KD_tau + s * (beta * mean_taps(1 - cos) + w_pixel * L_pi
           + w_pair * L_pa + w_at * AT + w_cwd * CWD),   a = s * alpha,  s = schedule factor.

    ``forward`` returns a dict of UNWEIGHTED terms: 'ce' always; 'kd' when alpha > 0;
    'feat' (mean over taps) when beta > 0, plus 'feat_<tap>' per tap for logging only;
    'pixel', 'pair', 'at' (+ 'at_<tap>'), 'cwd' when their weight is > 0. A term is computed
    whenever its base weight is > 0, also in epochs where the schedule sets its weight to 0
    (it is then logged but not added). ``set_epoch`` applies the progressive schedule
    (``kd_weight_scale``); ``weights()`` gives the effective weight of each summed term and
    ``total(terms)`` the weighted sum. With every KD weight 0 no teacher input is needed.

    Taps: 'kd' and 'cwd' use the logits; 'feat' the adapted student taps (``student_feats``,
    taps ``COSINE_TAPS``); 'at' the raw taps ``AT_TAPS``, 'pair' the raw ``PAIR_TAP``
    (encoder output) and 'pixel' the raw ``PIXEL_TAP`` (pre-ReLU last layer before the
    classifier) of ``student_raw`` and ``teacher_feats``.
    """

    AT_TAPS = ("low", "mid", "high")
    PAIR_TAP = "high"
    PIXEL_TAP = "preact"

    def __init__(self, alpha=0.0, beta=0.0, tau=4.0, pixel=0.0, pair=0.0, at=0.0, cwd=0.0,
                 cwd_tau=4.0, pair_grid=3, schedule="constant", warmup_epochs=0, step_epoch=1):
        super().__init__()
        alpha, beta, tau, cwd_tau = float(alpha), float(beta), float(tau), float(cwd_tau)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (weight of the KD term) must be in [0, 1], got {alpha}")
        if not (beta >= 0.0 and math.isfinite(beta)):
            raise ValueError(f"beta (weight of the feature term) must be a finite number >= 0, "
                             f"got {beta}")
        for name, value in (("tau", tau), ("cwd_tau", cwd_tau)):
            if not (value > 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} (temperature) must be a finite number > 0, got {value}")
        self.extra = {"pixel": float(pixel), "pair": float(pair), "at": float(at),
                      "cwd": float(cwd)}
        for name, value in self.extra.items():
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"weight of the {name} term must be a finite number >= 0, "
                                 f"got {value}")
        if schedule not in KD_SCHEDULES:
            raise ValueError(f"unknown KD schedule {schedule!r}; choose one of "
                             f"{', '.join(KD_SCHEDULES)}")
        self.alpha, self.beta, self.tau, self.cwd_tau = alpha, beta, tau, cwd_tau
        self.pair_grid = int(pair_grid)
        self.schedule, self.warmup_epochs, self.step_epoch = schedule, warmup_epochs, step_epoch
        self.scale = 1.0  # schedule factor of the current epoch (set_epoch)

    def extra_repr(self):
        extra = "".join(f", {k}={v}" for k, v in self.extra.items() if v > 0)
        return (f"alpha={self.alpha}, beta={self.beta}, tau={self.tau}{extra}, "
                f"schedule={self.schedule}")

    def set_epoch(self, epoch):
        """Scale every distillation weight by the schedule's factor for ``epoch`` (1-based)."""
        self.scale = kd_weight_scale(epoch, self.schedule, self.warmup_epochs, self.step_epoch)
        return self.scale

    def needs(self):
        """What ``forward`` needs as inputs, from the base weights (the one place engine asks).

        'teacher_logits', 'adapted' (adapted student taps), 'raw' (raw student taps),
        'preact' (the raw taps must include the pre-activation map).
        """
        needs = set()
        if self.alpha > 0 or self.extra["cwd"] > 0:
            needs.add("teacher_logits")
        if self.beta > 0:
            needs.add("adapted")
        if self.extra["pair"] > 0 or self.extra["at"] > 0 or self.extra["pixel"] > 0:
            needs.add("raw")
        if self.extra["pixel"] > 0:
            needs.add("preact")
        return needs

    def weights(self):
        """Effective weight of each term that ``total`` sums; the one place weights are set.

        Every distillation weight is multiplied by the schedule factor; CE gets 1 - the
        effective alpha. The new terms appear only when their base weight is > 0.
        """
        alpha = self.alpha * self.scale
        weights = {"ce": 1.0 - alpha, "kd": alpha, "feat": self.beta * self.scale}
        weights.update({name: w * self.scale for name, w in self.extra.items() if w > 0})
        return weights

    def forward(self, student_logits, target, teacher_logits=None, student_feats=None,
                teacher_feats=None, student_raw=None):
        """Unweighted named loss terms (dict of scalar tensors); see the class docstring.

        student_feats: dict tap name -> (N, C, H, W) of the student's taps already adapted to
        the teacher's channels (for 'feat'); teacher_feats: the teacher's taps (raw; a
        superset of the taps used); student_raw: the student's raw taps (for 'pixel',
        'pair', 'at').
        """
        terms = {"ce": cross_entropy_loss(student_logits, target)}
        if self.alpha > 0 or self.extra["cwd"] > 0:
            if teacher_logits is None:
                raise ValueError(f"alpha={self.alpha} or cwd={self.extra['cwd']} > 0 needs "
                                 "teacher_logits")
        if self.alpha > 0:
            terms["kd"] = hinton_kd_loss(student_logits, teacher_logits, self.tau)
        if self.beta > 0:
            if not student_feats or not teacher_feats:
                raise ValueError(f"beta={self.beta} > 0 needs non-empty student_feats and "
                                 f"teacher_feats dicts")
            missing = set(student_feats) - set(teacher_feats)
            if missing:
                raise ValueError(f"student_feats and teacher_feats must have the same taps; the "
                                 f"teacher lacks {sorted(missing)} (has {sorted(teacher_feats)})")
            per_tap = []
            for name in student_feats:
                term = cosine_feature_loss(student_feats[name], teacher_feats[name])
                terms[f"feat_{name}"] = term
                per_tap.append(term)
            terms["feat"] = torch.stack(per_tap).mean()
        raw_taps = {"pixel": (self.PIXEL_TAP,), "pair": (self.PAIR_TAP,), "at": self.AT_TAPS}
        for name, taps in raw_taps.items():
            if self.extra[name] > 0:
                for tap in taps:
                    if not student_raw or tap not in student_raw or not teacher_feats \
                            or tap not in teacher_feats:
                        raise ValueError(f"the {name} term needs the {tap!r} tap in both "
                                         "student_raw and teacher_feats")
        if self.extra["pixel"] > 0:
            terms["pixel"] = pixelwise_preact_loss(student_raw[self.PIXEL_TAP],
                                                   teacher_feats[self.PIXEL_TAP])
        if self.extra["pair"] > 0:
            terms["pair"] = pairwise_similarity_loss(student_raw[self.PAIR_TAP],
                                                     teacher_feats[self.PAIR_TAP], self.pair_grid)
        if self.extra["at"] > 0:
            per_tap = []
            for tap in self.AT_TAPS:
                term = attention_transfer_loss(student_raw[tap], teacher_feats[tap])
                terms[f"at_{tap}"] = term
                per_tap.append(term)
            terms["at"] = torch.stack(per_tap).mean()
        if self.extra["cwd"] > 0:
            terms["cwd"] = cwd_loss(student_logits, teacher_logits, self.cwd_tau)
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
