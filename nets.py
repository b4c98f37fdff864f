"""Build any model of the toolkit by name, load weights, and rebuild a model from a checkpoint.

Names: the compact students ``lite`` and ``lab`` (student_model.py) and torchvision's
segmentation models (``fcn_resnet50``, ``fcn_resnet101``, ``deeplabv3_resnet50``,
``deeplabv3_resnet101``, ``lraspp_mobilenet_v3_large``, ``deeplabv3_mobilenet_v3_large``).

Every checkpoint this repo writes holds ``model`` (a state dict) and ``model_args``
(``{'arch': ..., 'num_classes': ...}``, plus ``'widths'`` for a channel-pruned student), so
``build_model(**model_args)`` rebuilds it alone.
"""
import urllib.error
import zipfile
from pathlib import Path

import torch
from torchvision.models import get_model_weights
from torchvision.models import segmentation as tv_seg

from cli import UserError, one_line

STUDENT_ARCHS = ("lite", "lab")
TORCHVISION_ARCHS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                     "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
TEACHER_ARCHS = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101")
BASELINE_STUDENTS = ("lraspp_mobilenet_v3_large",)  # off-the-shelf students without taps


def load_pretrained(build, weights, what, fix):
    """``build()``, which loads torchvision's ``weights``; a failed download becomes one line.

    torch reads its hub cache before it downloads, so the message names the exact file that
    an offline user can place there, and ``fix``, the flag that does without it.
    """
    try:
        return build()
    except (urllib.error.URLError, OSError, RuntimeError) as exc:  # offline, or a broken file
        name = weights.url.rsplit("/", 1)[-1]
        raise UserError(f"could not load {what} ({one_line(exc, 160)}); offline, copy {name} into "
                        f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or {fix}") from None


def with_model_args(model, arch, num_classes, widths=None):
    """``model`` with the ``model_args`` every checkpoint records, so that
    ``build_model(**model_args)`` rebuilds it alone; ``widths`` (a pruned student's layer
    widths) only where there are some, so an unpruned model's record stays as it was."""
    model.model_args = {"arch": arch, "num_classes": num_classes}
    if widths:
        model.model_args["widths"] = {name: list(shape) for name, shape in widths.items()}
    return model


def build_model(arch, num_classes=21, pretrained=False, widths=None):
    """A model by name; ``pretrained`` downloads torchvision's weights (backbone for students);
    ``widths``: the layer widths of a channel-pruned compact student (its model_args)."""
    if arch in STUDENT_ARCHS:
        from student_model import CompactStudentModel
        return CompactStudentModel(variant=arch, num_classes=num_classes,
                                   pretrained_backbone=pretrained, widths=widths)
    if arch not in TORCHVISION_ARCHS:
        raise UserError(f"unknown model {arch!r}; choose one of "
                        f"{', '.join(STUDENT_ARCHS + TORCHVISION_ARCHS)}")
    if widths:
        raise UserError(f"{arch}: only the compact students ({', '.join(STUDENT_ARCHS)}) can be "
                        "rebuilt with pruned widths; pass a checkpoint of one")
    builder = getattr(tv_seg, arch)
    extra = {} if arch.startswith("lraspp") else {"aux_loss": True}
    if not pretrained:
        # weights_backbone=None: no ImageNet download for a randomly initialised model
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **extra)
        return with_model_args(model, arch, num_classes)
    if num_classes != 21:
        raise UserError(f"torchvision's pretrained {arch} predicts 21 VOC classes, not "
                        f"{num_classes}; use --weights none or a checkpoint")
    weights = get_model_weights(arch).DEFAULT
    model = load_pretrained(lambda: builder(weights=weights, **extra), weights,
                            f"torchvision's {arch} weights",
                            "pass a local state dict as the weights PATH, or 'none' for random "
                            "weights")
    return with_model_args(model, arch, num_classes)


def build_student(arch, num_classes=21, pretrained_backbone=True):
    """A student to train: a compact one, or an off-the-shelf baseline (BASELINE_STUDENTS)
    whose ImageNet backbone is loaded when ``pretrained_backbone`` (offline: a one-line
    error naming the file to place in torch's hub cache, like the compact students)."""
    if arch not in BASELINE_STUDENTS:
        return build_model(arch, num_classes, pretrained=pretrained_backbone)
    if not pretrained_backbone:
        return build_model(arch, num_classes, pretrained=False)
    weights = get_model_weights("mobilenet_v3_large").IMAGENET1K_V1
    model = load_pretrained(
        lambda: getattr(tv_seg, arch)(weights=None, num_classes=num_classes,
                                      weights_backbone=weights),
        weights, f"{arch}'s ImageNet backbone",
        "pass --no-pretrained-backbone to start from random weights")
    return with_model_args(model, arch, num_classes)


def read_checkpoint(path):
    """``torch.load`` with the errors a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError(f"{path}: cannot read checkpoint ({one_line(exc, 120)}); the file is "
                        "truncated or not a PyTorch file: re-save or re-download it") from None


def split_checkpoint(obj):
    """(state_dict, model_args or None) from a repo checkpoint or a bare state dict."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"], obj.get("model_args")
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise UserError("checkpoint holds neither a state dict nor a {'model': state_dict} record")


def load_state(model, state_dict, path, arch):
    """``load_state_dict`` that names the mismatch instead of dumping every key."""
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        sample = (result.missing_keys or result.unexpected_keys)[0]
        raise UserError(f"{path}: weights do not fit {arch} ({len(result.missing_keys)} missing, "
                        f"{len(result.unexpected_keys)} unexpected keys, e.g. {sample!r}); pass a "
                        "checkpoint of the same architecture")
    return model


def load_model(arch, weights, num_classes=21):
    """``weights``: 'default' (torchvision's pretrained), 'none' (random) or a PATH.

    PATH is a bare state dict of ``arch`` or any checkpoint this repo writes; a checkpoint
    that records another architecture or class count is refused with a clear message.
    """
    if weights == "default" and arch in STUDENT_ARCHS:
        # build_model would give an ImageNet backbone under a random head: no teacher at all
        raise UserError(f"no pretrained {arch} teacher exists ('default' weights are "
                        "torchvision's, for its own models); pass a checkpoint of a trained "
                        f"{arch}, e.g. --teacher-weights models/NAME_best.pth")
    if weights in ("default", "none"):
        return build_model(arch, num_classes, pretrained=weights == "default")
    state, model_args = split_checkpoint(read_checkpoint(weights))
    if model_args is not None:
        if model_args.get("arch") != arch or model_args.get("num_classes", num_classes) != num_classes:
            raise UserError(f"{weights}: checkpoint is a {model_args.get('arch')} with "
                            f"{model_args.get('num_classes')} classes, not a {arch} with "
                            f"{num_classes}; pass the matching checkpoint or architecture")
    # the checkpoint's own model_args: a pruned student comes back with its widths
    model = build_model(**{"arch": arch, "num_classes": num_classes, **(model_args or {})})
    try:
        return load_state(model, state, weights, arch)
    except RuntimeError as exc:  # same keys, other shapes (e.g. another class count)
        raise UserError(f"{weights}: weights do not fit {arch} with {num_classes} classes "
                        f"({one_line(exc, 160)}); pass a checkpoint of the same architecture") from None


def model_from_checkpoint(path):
    """Rebuild a model from a repo checkpoint alone; returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    state, model_args = split_checkpoint(ckpt)
    if model_args is None:
        raise UserError(f"{path}: a bare state dict does not say which model it is; pass a "
                        "checkpoint written by train_kd.py (it records model_args)")
    model = build_model(**model_args, pretrained=False)
    try:
        load_state(model, state, path, model_args["arch"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit {model_args} ({one_line(exc, 160)})") from None
    return model, ckpt
