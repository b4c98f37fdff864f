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
from utils import device_name, git_revision, save_json, synchronize


def logits_of(output):
    """torchvision's segmentation models return {'out': ..., 'aux': ...}; ours a tensor."""
    return output["out"] if isinstance(output, dict) else output


@torch.inference_mode()
def evaluate(model, loader, device, num_classes=21, warmup=3, amp=False, desc="eval",
             keep=None, progress=True, reduce=None):
    """Score ``model`` on ``loader`` (batches of full-size images, usually batch size 1).

    Returns a dict with mIoU, pixel accuracy, mean class accuracy, per-class IoU (a name ->
    value dict, None where undefined), the confusion matrix, per-image mIoU and number of
    ground-truth classes, and timing:
    ``ms_per_image`` is the median over batches of (model time / images in the batch),
    after ``warmup`` untimed calls on the first batch; ``fps`` is its inverse.
    ``keep(index, target, pred)``, when given, sees every image's prediction (CPU tensors;
    ``index`` is the position in the dataset), for overlays.
    ``reduce(confmat)``, when given, returns the confusion matrix summed over the processes
    of a torchrun job, each of which scored its own shard of the images (the scores are
    then over the whole set; per-image lists and timings stay this process's).
    """
    model.eval()
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    per_image, per_image_classes, times = [], [], []
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
            per_image_classes.append(int((cm.sum(1) > 0).sum()))
            if keep is not None:
                keep(index, target, pred)
            index += 1
    if reduce is not None:
        confmat = reduce(confmat)
        index = int(reduce(torch.tensor(index)))
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
        "per_image_gt_classes": per_image_classes,  # classes in each image's ground truth
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
    model.to(device)
    results = evaluate(model, loader, device, amp=amp, desc=title, keep=keep)
    results.update(params=params, device=str(device), hardware=device_name(device),
                   git=git_revision(), **(extra or {}))
    print(format_results(results, title))
    if json_path:
        save_json(results, json_path)
        print(f"results written to {json_path}")
    return results


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; carries the terms and the step for the message."""


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); ``partial`` records the epoch's progress so far."""

    def __init__(self, partial):
        super().__init__(f"interrupted at epoch {partial['epoch']}, step {partial['step']}")
        self.partial = partial


def rng_state():
    """The random state the training step draws from (CPU, and CUDA when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train_one_epoch(student, criterion, optimizer, loader, device, epoch, teacher=None,
                    adapters=None, scaler=None, amp_dtype=None, progress=True, check=None,
                    partial=None, log_every=0):
    """One pass over ``loader``; returns the mean of every loss term as ``loss_<name>``.

    The teacher runs only when a term needs it (``criterion.needs()``), once per step for
    its logits and all its taps; the student returns its taps only when a feature term
    is on. ``amp_dtype`` (e.g. torch.float16) turns on autocast; the soft losses still
    compute in float32 (losses.py).

    ``check(nonfinite) -> (nonfinite anywhere, stop requested anywhere)`` is called once per
    step, before the backward pass, so that every process of a torchrun job takes the same
    decision; without it only the local loss is checked. A stop raises ``Interrupted`` after
    the step, carrying the partial record that ``partial`` takes back to finish the epoch:
    its first ``step`` batches are drawn again and dropped (so the sampler and the workers'
    augmentation streams are where they were), then the random state is restored, so the
    resumed epoch is the one an unbroken run would have had.
    """
    student.train()
    if adapters is not None:
        adapters.train()
    needs = criterion.needs()
    need_logits, need_adapted = "teacher_logits" in needs, "adapted" in needs
    need_feats = need_adapted or "raw" in needs
    start = partial["step"] if partial else 0
    sums = dict(partial["sums"]) if partial else {}
    batches = partial["batches"] if partial else 0
    means = lambda: {f"loss_{name}": value / max(batches, 1) for name, value in sums.items()}
    if start >= len(loader):  # stopped after its last step: only validation is left
        set_rng_state(partial["rng"])
        return means()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
    for step, (images, targets) in enumerate(bar):
        if step < start:
            if step == start - 1:
                set_rng_state(partial["rng"])
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            t_logits = t_feats = s_feats = s_raw = None
            if teacher is not None and (need_logits or need_feats):
                t_logits, t_feats = teacher(images)
            if need_feats:
                logits, s_raw = student(images, return_features=True,
                                        return_preact="preact" in needs)
                if need_adapted:
                    s_feats = adapters(s_raw)
            else:
                logits = logits_of(student(images))
            terms = criterion(logits, targets, t_logits if need_logits else None, s_feats,
                              t_feats if need_feats else None, student_raw=s_raw)
            total = criterion.total(terms)
        local_bad = not bool(torch.isfinite(total))
        bad, stop = check(local_bad) if check is not None else (local_bad, False)
        if bad:
            shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            where = "" if local_bad else " in another process of the job"
            raise NonFiniteLoss(f"non-finite loss{where} at epoch {epoch}, step {step + 1}/"
                                f"{len(loader)}: total={float(total.detach()):.4g} ({shown})")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        batches += 1
        for name, value in list(terms.items()) + [("total", total)]:
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        bar.set_postfix(loss=f"{sums['total'] / batches:.4f}")
        if log_every and (step + 1) % log_every == 0:
            tqdm.write(f"epoch {epoch} step {step + 1}/{len(loader)} loss "
                       f"{sums['total'] / batches:.4f}")
        if stop:
            raise Interrupted({"epoch": epoch, "step": step + 1, "sums": sums,
                               "batches": batches, "rng": rng_state()})
    return means()


def checkpoint_state(student, adapters, optimizer, scheduler, scaler, epoch, args, best_miou,
                     partial=None):
    """The one checkpoint schema: enough to rebuild the model alone, and to resume exactly.

    ``epoch`` counts finished epochs; ``partial``, for a run stopped mid-epoch, records the
    progress of the next one (``train_one_epoch``'s ``Interrupted.partial``, with the
    random state of every process as a list by rank).
    """
    return {
        "model": student.state_dict(),  # inference weights only: the adapters live apart
        "model_args": dict(student.model_args),
        "adapters": adapters.state_dict() if adapters is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "args": dict(args) if not hasattr(args, "__dict__") else vars(args),
        "best_miou": best_miou,
        "partial": partial,
    }


def restore_training_state(ckpt, student, adapters, optimizer, scheduler, scaler):
    """Load a checkpoint written by ``checkpoint_state``; returns (finished epochs, best mIoU,
    the partial record of the epoch in progress or None)."""
    student.load_state_dict(ckpt["model"])
    if adapters is not None:
        if ckpt.get("adapters") is None:
            raise KeyError("adapters")
        adapters.load_state_dict(ckpt["adapters"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt["best_miou"], ckpt.get("partial")
