"""The distillation model: what runs in a training step besides the loss.

- ``TAPS`` / ``feature_taps``: the one table of feature taps, per architecture, naming where
  each network's 'low', 'mid', 'high' and 'preact' features come from, and their widths.
- ``FrozenTeacher``: the teacher, frozen in one place, giving logits and every tap from one
  forward pass.
- ``FeatureAdapters``: the training-only 1x1 convs from the student's taps to the teacher's
  widths (kept out of the student, so a deployed student carries none of them).
- ``Distiller``: student, adapters and teacher run for one criterion, returning the
  ``losses.Outputs`` the criterion's active terms read.
- ``build_teacher`` and ``build_distiller``: the one way train_kd.py, throughput.py,
  benchmark.py and the tests put these together.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.feature_extraction import create_feature_extractor

from cli import UserError
from losses import FEATURE_TAPS, Outputs
from nets import STUDENT_ARCHS, load_model
from student_model import CompactStudentModel

# Feature taps per architecture: arch -> {tap: (return node, channels)}.
# torchvision's ResNet segmentation models dilate layer3/layer4 (output stride 8), so
# layer1 sits at stride 4 and layer2/layer4 at stride 8. 'preact' is the PRE-ReLU output
# of the last layer before the classifier (the pixel-wise loss L_pi): the BatchNorm of the
# head's last 3x3 conv (FCNHead: classifier.1, 512 ch; DeepLabHead: classifier.2, 256 ch),
# the counterpart of the student's last refinement BN. The compact students return their
# taps themselves (``forward(return_features=True, return_preact=True)``): node None; their
# widths here are the unpruned ones, a channel-pruned model's own are model.feature_channels.
RESNET_TAPS = dict(zip(FEATURE_TAPS, [("backbone.layer1", 256), ("backbone.layer2", 512),
                                      ("backbone.layer4", 2048)]))
TAPS = {
    "fcn_resnet50": {**RESNET_TAPS, "preact": ("classifier.1", 512)},
    "fcn_resnet101": {**RESNET_TAPS, "preact": ("classifier.1", 512)},
    "deeplabv3_resnet50": {**RESNET_TAPS, "preact": ("classifier.2", 256)},
    "deeplabv3_resnet101": {**RESNET_TAPS, "preact": ("classifier.2", 256)},
    **{variant: {**{name: (None, ch) for name, ch in CompactStudentModel.FEATURE_CHANNELS.items()},
                 "preact": (None, CompactStudentModel.PREACT_CHANNELS[variant])}
       for variant in STUDENT_ARCHS},
}


def feature_taps(arch):
    """{tap: (node or None, channels)} of ``arch``: 'low', 'mid', 'high' and 'preact'."""
    if arch in TAPS:
        return dict(TAPS[arch])
    raise UserError(f"{arch} has no feature taps for distillation; use one of "
                    f"{', '.join(TAPS)}")


def feature_channels(arch):
    """Channels of the 'low', 'mid', 'high' taps of ``arch`` (those the adapters map)."""
    taps = feature_taps(arch)
    return {name: taps[name][1] for name in FEATURE_TAPS}


class FrozenTeacher(nn.Module):
    """The teacher, frozen in this one place: eval mode, requires_grad off, forward under no_grad.

    ``forward(x)`` returns (full-size logits, {'low', 'mid', 'high'} features, plus 'preact'
    when built with ``preact=True``), all from ONE forward pass. Features of torchvision
    models come through ``create_feature_extractor`` (no hand-written hooks); the logits
    are the main classifier's output upsampled bilinearly to the input, as torchvision does
    (the node is found from the head itself, so FCN and DeepLabV3 both work; the aux head
    is never computed).
    """

    def __init__(self, model, arch, preact=False):
        super().__init__()
        self.arch, self.preact = arch, preact
        # a compact teacher (perhaps a pruned one) carries its own widths
        self.channels = dict(model.feature_channels) if arch in STUDENT_ARCHS \
            else feature_channels(arch)
        if arch in STUDENT_ARCHS:  # a compact model can teach too (the offline demo)
            self.net = model
        else:
            nodes = {node: name for name, (node, _) in feature_taps(arch).items()
                     if name != "preact" or preact}
            nodes[f"classifier.{len(model.classifier) - 1}"] = "out"  # main head's last conv
            self.net = create_feature_extractor(model, return_nodes=nodes)
        self.net.eval().requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)  # model.train() on a parent never unfreezes BN statistics

    @torch.no_grad()  # not inference_mode: its tensors cannot be saved for the student's backward
    def forward(self, x):
        if self.arch in STUDENT_ARCHS:
            return self.net(x, return_features=True, return_preact=self.preact)
        out = self.net(x)
        logits = F.interpolate(out.pop("out"), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return logits, out


class FeatureAdapters(nn.Module):
    """Training-only 1x1 convs mapping student taps to teacher widths for feature distillation.

    Kept out of ``CompactStudentModel`` so the deployed student and its checkpoints carry
    no distillation-only weights.
    """

    def __init__(self, student_channels, teacher_channels):
        super().__init__()
        if set(student_channels) != set(teacher_channels):
            raise ValueError(f"student taps {sorted(student_channels)} and teacher taps "
                             f"{sorted(teacher_channels)} differ")
        self.adapters = nn.ModuleDict({name: nn.Conv2d(student_channels[name],
                                                       teacher_channels[name], 1)
                                       for name in student_channels})

    def forward(self, feats):
        """{tap: adapted map} for every tap with an adapter; other entries of ``feats`` (the
        student's 'preact') pass by, so callers hand over the student's taps as they come."""
        missing = set(self.adapters) - set(feats)
        if missing:
            raise KeyError(f"taps {sorted(missing)} are missing; the adapters need "
                           f"{sorted(self.adapters)}")
        return {name: adapter(feats[name]) for name, adapter in self.adapters.items()}


def logits_of(output):
    """torchvision's segmentation models return {'out': ..., 'aux': ...}; ours a tensor."""
    return output["out"] if isinstance(output, dict) else output


def unwrapped(module):
    """The module inside a DistributedDataParallel wrapper, or ``module`` itself."""
    return module.module if isinstance(module, DistributedDataParallel) else module


class Distiller(nn.Module):
    """The student with its adapters and the frozen teacher, run for one criterion.

    ``forward(images)`` returns the student's and the teacher's ``losses.Outputs`` holding
    just what the criterion's active terms read (``criterion.needs()``): the teacher runs
    only when a term is on, once per step for its logits and all its taps; the student
    returns its taps only when a term reads them. ``student`` and ``adapters`` may be
    DistributedDataParallel wrappers; the teacher is never wrapped (it has no gradients).
    """

    def __init__(self, student, criterion, teacher=None, adapters=None):
        super().__init__()
        self.student, self.adapters = student, adapters
        self.teacher = teacher if criterion.active() else None
        needs = criterion.needs()
        self.taps, self.preact = bool(needs), "preact" in needs

    def forward(self, images):
        teacher = Outputs(*self.teacher(images)) if self.teacher is not None else None
        if not self.taps:
            return Outputs(logits_of(self.student(images))), teacher
        logits, taps = self.student(images, return_features=True, return_preact=self.preact)
        adapted = self.adapters(taps) if self.adapters is not None else None
        return Outputs(logits, taps, adapted), teacher

    def trainable_parameters(self):
        """What the optimizer updates: the student's, then the adapters' parameters."""
        adapters = list(self.adapters.parameters()) if self.adapters is not None else []
        return list(self.student.parameters()) + adapters


def build_teacher(criterion, arch, weights):
    """The frozen teacher ``arch`` with ``weights`` (nets.load_model), with its pre-activation
    tap when a term reads it; None when no distillation term is on (it is never built)."""
    if not criterion.active():
        return None
    return FrozenTeacher(load_model(arch, weights), arch, preact="preact" in criterion.needs())


def build_distiller(student, criterion, teacher=None, wrap=None):
    """The ``Distiller`` of ``student`` for ``criterion``: adapters to the teacher's widths
    when a term reads adapted taps, placed on the student's device. ``wrap`` (e.g.
    DistributedDataParallel) is applied to the student and the adapters, never to the
    frozen teacher, which has no gradients to synchronise."""
    adapters = None
    if teacher is not None and "adapted" in criterion.needs():
        device = next(student.parameters()).device
        adapters = FeatureAdapters(student.feature_channels, teacher.channels).to(device)
    wrap = wrap or (lambda module: module)
    return Distiller(wrap(student), criterion, teacher,
                     None if adapters is None else wrap(adapters))


def build_optimizer(name, params, lr, weight_decay, device):
    """AdamW ('adam') or SGD with momentum 0.9, updating all tensors at once: fused kernels on
    CUDA; on a CPU the foreach form, which computes the same bits as the per-tensor loop in
    less time (fused would change them; docs/benchmark.md, "Optimizers")."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, **fast)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fast)


def build_weight_average(student, decay):
    """An exponential moving average of the student's weights and BatchNorm statistics
    (torch.optim.swa_utils.AveragedModel, as torchvision's references' --model-ema), or None
    for ``decay`` 0. After every optimizer step ``update_parameters(student)`` makes it
    w_avg <- decay * w_avg + (1 - decay) * w (the first update copies w): what a run with
    --ema-decay scores and saves, in place of the last step's weights, which are noisy while
    the learning rate is still large. A copy beside the student: training is unchanged."""
    if not decay:
        return None
    return torch.optim.swa_utils.AveragedModel(
        unwrapped(student), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay),
        use_buffers=True)
