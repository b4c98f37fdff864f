"""Dataset-level segmentation scores from one confusion matrix.

The VOC protocol: accumulate a single 21x21 confusion matrix over every pixel of the whole
validation set (label 255 ignored), then derive the scores from it. Averaging per-batch or
per-image mIoUs gives a different, incomparable number.

mIoU rule: IoU_c = TP_c / (TP_c + FP_c + FN_c); the mean runs over the classes that occur in
the ground truth or the prediction (TP + FP + FN > 0), background included. A class absent
from both has no defined IoU (reported as None) and does not count. This is what torchmetrics'
``MulticlassJaccardIndex(average='macro', ignore_index=255)`` computes, and on the full VOC
val set, where every class occurs, it equals the plain mean over the 21 classes.
"""
import math

import torch

from data import IGNORE_INDEX


def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_INDEX):
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction,
    for a whole batch, on the tensors' device: one bincount of ``target * C + pred``, the
    computation of torchmetrics' ``multiclass_confusion_matrix`` (the tests' reference), made
    faster (measured in docs/benchmark.md, "Evaluation"): ignored pixels go to an extra bin
    rather than being cut out with a mask, and the indices are int32. Labels are not checked:
    the loader has (data.load_mask)."""
    n = num_classes
    index = torch.where(target == ignore_index, n * n,
                        target.to(torch.int32) * n + pred.to(torch.int32)).flatten()
    if index.device.type == "mps":  # MPS's bincount has been very slow on millions of
        index = index.cpu()           # values (pytorch#184779): count on the CPU
    counts = torch.bincount(index, minlength=n * n + 1)[: n * n]
    return counts.view(n, n).to(pred.device)


def scores_from_confusion(confmat):
    """Per-class IoU and accuracy, mIoU, pixel accuracy and mean class accuracy.

    Undefined per-class values (class absent from both truth and prediction for IoU, from
    truth for accuracy) are NaN and left out of the means.
    """
    cm = confmat.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = cm.sum()
    return {
        "miou": _nanmean(iou),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_accuracy": _nanmean(acc),
        "per_class_iou": iou.tolist(),
        "per_class_accuracy": acc.tolist(),
    }


def _nanmean(values):
    valid = values[~values.isnan()]
    return float(valid.mean()) if valid.numel() else float("nan")


def nan_to_none(values):
    """JSON has no NaN: undefined scores become null."""
    return [None if (v is None or math.isnan(v)) else v for v in values]
