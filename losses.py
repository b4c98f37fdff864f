"""Losses for training and distilling the segmentation student, and the one criterion.

The training objective, stated once here (train_kd.py and docs/losses.md point to it):

    L = (1 - alpha) * CE + alpha * KD_tau + beta * FEAT
        + w_pixel * L_pi + w_pair * L_pa + w_at * AT + w_cwd * CWD

    CE      pixel-wise cross-entropy with the labels, void pixels (255) ignored
    KD_tau  tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over pixels
    FEAT    1 - cosine of adapted student and teacher features per pixel, averaged over
            the pixels, then over the low/mid/high taps
    L_pi, L_pa  the seed paper's pixel-wise pre-activation and pair-wise similarity losses;
    AT, CWD     attention transfer and channel-wise distillation (each function says how)

A progressive schedule (``kd_weight_scale``, --kd-schedule) scales every distillation
weight per epoch, and CE gets 1 - the effective alpha. docs/losses.md maps this onto the
lab handout's notation (alpha_lab = 1 - alpha, beta_lab = alpha).

Every loss is a small function. ``TERMS`` is the one table of distillation terms: each row
names its loss, what it reads, its weight flag with default and range, and its parameters;
train_kd.py's flags, the criterion's weights and inputs, and the logged keys come from it.
``DistillationCriterion`` returns the unweighted named terms (``forward``), sets the weights
(``weights``) and sums them (``total``). To add a term: its loss function and a row of TERMS.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cli import Option
from data import IGNORE_INDEX


def _check_4d(name, x):
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (N, C, H, W); got shape {tuple(x.shape)}")


def _check_pair(s_name, s, t_name, t, channels=False):
    """Both 4-D with one batch size, and with ``channels`` one channel count (a student's
    feature passes through its 1x1 adapter first)."""
    _check_4d(s_name, s)
    _check_4d(t_name, t)
    if s.shape[0] != t.shape[0] or (channels and s.shape[1] != t.shape[1]):
        what = "batch size and channels (classes)" if channels else "batch size"
        raise ValueError(f"{s_name} and {t_name} must have the same {what} (map a student's "
                         f"feature through its adapter); got {tuple(s.shape)} and {tuple(t.shape)}")


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


def hinton_kd_loss(student_logits, teacher_logits, tau):
    """Soft-target distillation loss of Hinton et al. (2015), "Distilling the Knowledge in a
    Neural Network": tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)).

    The KL is summed over classes at each pixel and averaged over the N*H*W pixels, so the
    value does not grow with the image size (a 4-D ``batchmean`` would). tau^2 keeps the
    soft-target gradients, which scale as 1/tau^2, on the scale of the hard-label ones as tau
    changes. float32 with autocast off, so it stays finite under bf16/fp16 AMP even for large
    tau. The teacher is a fixed target (detached), resized bilinearly to the student's size.

    student_logits, teacher_logits: (N, C, H, W) (teacher may have another H, W); tau > 0.
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits, channels=True)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        # per-pixel KL over the classes, shape (N, H, W), averaged over the pixels
        kl = _tempered_kl(student_logits, _align(teacher_logits, student_logits), tau, dim=1)
        return kl.mean() * (tau * tau)


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
    _check_pair("student_feat", student_feat, "teacher_feat", teacher_feat, channels=True)
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
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits, channels=True)
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


# The feature taps both networks give, by name (distill.TAPS says where each comes from)
FEATURE_TAPS = ("low", "mid", "high")


class Outputs(NamedTuple):
    """What one network produced for a batch: logits, raw taps by name, and (student only)
    the taps mapped through the 1x1 adapters to the teacher's channels."""
    logits: torch.Tensor
    taps: Optional[dict] = None
    adapted: Optional[dict] = None


def _per_tap(loss, source="taps"):
    """A term computed on each of the FEATURE_TAPS (student ``source`` vs teacher raw taps);
    it is the mean over the taps, and each tap is logged on its own."""
    return lambda student, teacher, params: {
        tap: loss(getattr(student, source)[tap], teacher.taps[tap]) for tap in FEATURE_TAPS}


@dataclass(frozen=True)
class Term:
    """One distillation term: its loss, what it reads, its weight flag and its parameters.

    ``loss(student, teacher, params)`` takes two ``Outputs`` and the parameters by dest name,
    and returns a scalar, or {tap: scalar} (then the term is their mean). ``reads`` names the
    inputs beyond the logits: 'taps' (raw taps of both), 'adapted' (the student's taps through
    adapters), 'preact' (both networks' pre-activation tap, in ``taps``).
    """
    loss: Callable
    reads: frozenset
    weight: Option
    params: tuple = ()
    # For the report: a human name, the right-hand side in typst math (written once here),
    # its symbol in report.total_formula, and its paper's key in architecture.CITATIONS.
    label: str = ""
    formula: str = ""
    symbol: str = ""
    paper: str = ""


# The one table of distillation terms: adding a term is a loss function and a row here.
# CE is not a row: it is the one rule "CE gets 1 - alpha" (DistillationCriterion.weights).
TERMS = {
    "kd": Term(lambda student, teacher, params: hinton_kd_loss(student.logits, teacher.logits,
                                                                params["tau"]), frozenset(),
               Option(("--alpha",), 0.0, "weight of the Hinton KD term; CE gets 1 - alpha "
                      "(0 = no response KD)", high=1.0),
               (Option(("--tau", "--temp"), 4.0, "softmax temperature of the KD term (--temp "
                       "is an alias)", open_low=True),),
               label="Response-based KD (Hinton)",
               formula=r'tau^2/abs(Omega) sum_(i in Omega) "KL"(sigma(z_T (i) \/ tau) || '
                       r'sigma(z_S (i) \/ tau))',
               symbol='cal(L)_"KD"', paper="hinton"),
    "feat": Term(_per_tap(cosine_feature_loss, "adapted"), frozenset({"adapted"}),
                 Option(("--beta",), 0.0, "weight of the cosine feature term, averaged over "
                        "the low/mid/high taps"),
                 label="Feature-based KD (cosine hint loss)",
                 formula=r'1/3 sum_(t in {"low", "mid", "high"}) 1/abs(Omega_t) '
                         r'sum_(i in Omega_t) (1 - cos(tilde(f)_S^t (i), f_T^t (i))), quad '
                         r'tilde(f)_S^t = "resize"(A_t (f_S^t))',
                 symbol='cal(L)_"feat"', paper="fitnets"),
    "pixel": Term(lambda student, teacher, params: pixelwise_preact_loss(
                      student.taps["preact"], teacher.taps["preact"]),
                  frozenset({"taps", "preact"}),
                  Option(("--w-pixel",), 0.0, "weight of the pixel-wise pre-activation loss "
                         "L_pi on the last layer before the classifier (seed paper: 100)"),
                  label="Pixel-wise pre-activation distillation (L_pi)",
                  formula=r'1/abs(Omega) sum_(i in Omega) m_i (G_T (i) - G_S (i))^2, quad '
                          r'G = sum_c F_c, quad m_i = cases(0 "if" G_S (i) <= G_T (i) <= 0, '
                          r'1 "otherwise")',
                  symbol='cal(L)_"pi"', paper="overhaul"),
    "pair": Term(lambda student, teacher, params: pairwise_similarity_loss(
                     student.taps["high"], teacher.taps["high"]),
                 frozenset({"taps"}),
                 Option(("--w-pair",), 0.0, "weight of the pair-wise similarity loss L_pa on "
                        "the encoder's 'high' tap, 3x3 nodes (seed paper: 1)"),
                 label="Pair-wise similarity distillation (L_pa)",
                 formula=r'1/g^4 sum_(j,k=1)^(g^2) (a^S_(j k) - a^T_(j k))^2, quad '
                         r'a_(j k) = hat(f)_j dot hat(f)_k, quad g = 3',
                 symbol='cal(L)_"pa"', paper="skd"),
    "at": Term(_per_tap(attention_transfer_loss), frozenset({"taps"}),
               Option(("--w-at",), 0.0, "weight of attention transfer, averaged over the "
                      "low/mid/high taps"),
               label="Attention transfer",
               formula=r'1/3 sum_t 1/abs(Omega_t) sum_(i in Omega_t) (q_S^t (i) - q_T^t (i))^2, '
                       r'quad q = m / norm(m)_2, quad m = 1/C sum_c F_c^2',
               symbol='cal(L)_"AT"', paper="attention_transfer"),
    "cwd": Term(lambda student, teacher, params: cwd_loss(student.logits, teacher.logits,
                                                           params["cwd_tau"]), frozenset(),
                Option(("--w-cwd",), 0.0, "weight of channel-wise distillation (CWD) on the "
                       "logits"),
                (Option(("--cwd-tau",), 4.0, "temperature of the CWD term", open_low=True),),
                label="Channel-wise distillation (CWD)",
                # its own temperature (--cwd-tau), apart from the KD term's tau
                formula=r'tau_"CWD"^2/C sum_(c=1)^C "KL"(sigma_(H W)(z_(T,c) \/ tau_"CWD") || '
                        r'sigma_(H W)(z_(S,c) \/ tau_"CWD"))',
                symbol='cal(L)_"CWD"', paper="cwd"),
}

# The cross-entropy term in the same typst math (not a row of TERMS: CE gets 1 - alpha).
CE_FORMULA = r'-1/abs(V) sum_(i in V) log sigma(z_S (i))_(y_i), quad V = {i : y_i != 255}'
CE_SYMBOL = 'cal(L)_"CE"'


def term_options():
    """Every (weight and parameter) option of the table, in order: the train_kd.py flags."""
    return [opt for term in TERMS.values() for opt in (term.weight, *term.params)]


def add_term_flags(group):
    """Add the table's flags to an argparse group (ranges checked as the flags are parsed)."""
    for opt in term_options():
        group.add_argument(*opt.flags, dest=opt.dest, type=opt.parse, default=opt.default,
                           metavar="X", help=f"{opt.help} (default: {opt.default:g})")


class DistillationCriterion(nn.Module):
    """The training objective of the module docstring, each weight scaled by the epoch's
    schedule factor (``kd_weight_scale``).

    ``weights``: {term name of TERMS: base weight} ('kd' is alpha); ``params``: the terms'
    parameters by dest name (tau, cwd_tau). ``forward(student, target, teacher)`` returns a
    dict of UNWEIGHTED terms: 'ce' always, and every term whose base weight is > 0 (also
    in epochs where the schedule sets its weight to 0: it is then logged but not added);
    a term computed per tap also logs '<name>_<tap>'. ``weights()`` gives the effective
    weight of every term and ``total(terms)`` the weighted sum. Ranges are checked where
    the numbers enter, by the parser (``Option``).
    """

    def __init__(self, weights=None, params=None, schedule="constant", warmup_epochs=0,
                 step_epoch=1):
        super().__init__()
        self.base = {name: float((weights or {}).get(name, 0.0)) for name in TERMS}
        unknown = set(weights or {}) - set(TERMS)
        if unknown:
            raise KeyError(f"unknown distillation terms {sorted(unknown)}; known: {sorted(TERMS)}")
        self.params = {opt.dest: opt.default for name in TERMS for opt in TERMS[name].params}
        self.params.update(params or {})
        self.schedule, self.warmup_epochs, self.step_epoch = schedule, warmup_epochs, step_epoch
        self.scale = 1.0  # schedule factor of the current epoch (set_epoch)

    @classmethod
    def from_args(cls, args):
        """The criterion of a train_kd.py command line (flags from ``add_term_flags``)."""
        return cls({name: getattr(args, term.weight.dest) for name, term in TERMS.items()},
                   {opt.dest: getattr(args, opt.dest) for t in TERMS.values() for opt in t.params},
                   args.kd_schedule, args.kd_warmup_epochs, args.kd_step_epoch)

    def extra_repr(self):
        active = ", ".join(f"{k}={w}" for k, w in self.base.items() if w > 0)
        return f"{active or 'no distillation'}, {self.params}, schedule={self.schedule}"

    def active(self):
        """The terms that are computed: base weight > 0."""
        return [name for name, w in self.base.items() if w > 0]

    def needs(self):
        """What the active terms read beyond the logits (``Term.reads``); empty: no teacher
        features, no adapters. With no active term no teacher is needed at all."""
        return set().union(*(TERMS[name].reads for name in self.active()))

    def set_epoch(self, epoch):
        """Scale every distillation weight by the schedule's factor for ``epoch`` (1-based)."""
        self.scale = kd_weight_scale(epoch, self.schedule, self.warmup_epochs, self.step_epoch)
        return self.scale

    def weights(self):
        """Effective weight of every term; the one place weights are set. Every distillation
        weight is multiplied by the schedule factor, and CE gets 1 - the effective alpha."""
        weights = {name: w * self.scale for name, w in self.base.items()}
        return {"ce": 1.0 - weights["kd"], **weights}

    def forward(self, student, target, teacher=None):
        """Unweighted named loss terms (scalar tensors) from ``Outputs`` of both networks."""
        terms = {"ce": cross_entropy_loss(student.logits, target)}
        for name in self.active():
            if teacher is None:
                raise ValueError(f"the {name} term needs the teacher's outputs")
            value = TERMS[name].loss(student, teacher, self.params)
            if isinstance(value, dict):  # per tap: log each, add their mean
                terms.update({f"{name}_{tap}": v for tap, v in value.items()})
                value = torch.stack(list(value.values())).mean()
            terms[name] = value
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
