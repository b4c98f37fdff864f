"""The evaluation loop shared by every script that scores a model (teacher, student, demo).

``evaluate`` runs a model over a loader of full-resolution images, accumulates one
confusion matrix over the whole set, and times the model calls alone (warm-up, device
synchronisation, median), apart from data loading and metric work.
"""
import statistics
import time

import torch
from tqdm import tqdm

from data import IGNORE_INDEX, VOC_CLASSES
from metrics import confusion_matrix, nan_to_none, scores_from_confusion
from utils import synchronize


def logits_of(output):
    """torchvision's segmentation models return {'out': ..., 'aux': ...}; ours a tensor."""
    return output["out"] if isinstance(output, dict) else output


@torch.inference_mode()
def evaluate(model, loader, device, num_classes=21, warmup=3, amp=False, desc="eval",
             keep=None, progress=True):
    """Score ``model`` on ``loader`` (batches of full-size images, usually batch size 1).

    Returns a dict with mIoU, pixel accuracy, mean class accuracy, per-class IoU (a name ->
    value dict, None where undefined), the confusion matrix, per-image mIoU, and timing:
    ``ms_per_image`` is the median over batches of (model time / images in the batch),
    after ``warmup`` untimed calls on the first batch; ``fps`` is its inverse.
    ``keep(index, target, pred)``, when given, sees every image's prediction (CPU tensors;
    ``index`` is the position in the dataset), for overlays.
    """
    model.eval()
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    per_image, times = [], []
    index = 0
    autocast = torch.autocast(device.type, enabled=amp and device.type in ("cuda", "cpu"))
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        with autocast:
            if not times:
                for _ in range(warmup):
                    logits_of(model(images))
            synchronize(device)
            start = time.perf_counter()
            logits = logits_of(model(images))
            synchronize(device)
        times.append((time.perf_counter() - start) / images.shape[0])
        if logits.shape[-2:] != targets.shape[-2:]:
            raise RuntimeError(f"model returned {tuple(logits.shape[-2:])} logits for a "
                               f"{tuple(targets.shape[-2:])} image; evaluation needs full size")
        preds = logits.argmax(1).cpu()
        for pred, target in zip(preds, targets):
            cm = confusion_matrix(pred, target, num_classes, IGNORE_INDEX)
            confmat += cm
            per_image.append(scores_from_confusion(cm)["miou"])
            if keep is not None:
                keep(index, target, pred)
            index += 1
    scores = scores_from_confusion(confmat)
    names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else [str(i) for i in range(num_classes)]
    ms = 1000 * statistics.median(times) if times else float("nan")
    return {
        "miou": scores["miou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "mean_class_accuracy": scores["mean_class_accuracy"],
        "per_class_iou": dict(zip(names, nan_to_none(scores["per_class_iou"]))),
        "num_images": index,
        "ms_per_image": ms,
        "fps": 1000 / ms if times else float("nan"),
        "per_image_miou": nan_to_none(per_image),
        "confusion_matrix": confmat.tolist(),
    }


def format_results(results, title):
    """The printed summary: headline scores, size and speed, then the per-class IoU table."""
    lines = [f"== {title} on {results['num_images']} images ({results['device']})",
             f"mIoU {100 * results['miou']:.2f} | pixel acc {100 * results['pixel_accuracy']:.2f} | "
             f"mean class acc {100 * results['mean_class_accuracy']:.2f}",
             f"params {results['params']:,} | {results['ms_per_image']:.2f} ms/image | "
             f"{results['fps']:.1f} FPS (median model time, batch 1)",
             "per-class IoU:"]
    for name, iou in results["per_class_iou"].items():
        lines.append(f"  {name:<12} {'   n/a' if iou is None else f'{100 * iou:6.2f}'}")
    return "\n".join(lines)


def evaluate_and_report(model, loader, device, title, params, json_path=None, extra=None,
                        keep=None, amp=False):
    """``evaluate`` plus what every evaluating script reports: print, and save the JSON."""
    from utils import device_name, git_revision, save_json
    model.to(device)
    results = evaluate(model, loader, device, amp=amp, desc=title, keep=keep)
    results.update(params=params, device=str(device), hardware=device_name(device),
                   git=git_revision(), **(extra or {}))
    print(format_results(results, title))
    if json_path:
        save_json(results, json_path)
        print(f"results written to {json_path}")
    return results
