"""The loops under every script: one evaluation for teacher and student, one training epoch.

``evaluate`` runs a model over a loader of full-resolution images, accumulates one
confusion matrix over the whole set, and times the model calls alone (warm-up, device
synchronisation, median), apart from data loading and metric work; ``time_interleaved``
times several models side by side (benchmark.py, compress.py). ``train_one_epoch`` trains a
``Distiller`` (student, adapters, frozen teacher) against a ``losses.DistillationCriterion``,
and can finish an epoch that a stop interrupted (checkpoints.py).
"""
import contextlib
import statistics
import time

import torch
from torch import nn
from tqdm import tqdm

from checkpoints import Interrupted, rng_state, set_rng_state
from data import IGNORE_INDEX, VOC_CLASSES, to_model_input
from losses import Outputs
from metrics import confusion_matrix, nan_to_none, scores_from_confusion
from utils import amp_dtype, device_name, git_revision, save_json, synchronize


def logits_of(output):
    """torchvision's segmentation models return {'out': ..., 'aux': ...}; ours a tensor."""
    return output["out"] if isinstance(output, dict) else output


def class_map(logits):
    """Each pixel's class: the argmax over dimension 1. ``max(1).indices`` is the same (the
    first maximum on ties), and 4x faster than ``argmax(1)`` on NCHW logits on a CPU."""
    return logits.max(1).indices


@contextlib.contextmanager
def no_cudnn_autotuning():
    """cuDNN's benchmark mode off for the block: every full-size image has its own shape, and
    autotuning each one would cost more than it gains (training crops keep it on)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@no_cudnn_autotuning()
@torch.inference_mode()
def evaluate(model, loader, device, num_classes=21, warmup=3, amp=False, desc="eval",
             progress=True, reduce=None, per_image=False):
    """Score ``model`` on ``loader`` (batches of full-size images, usually batch size 1).

    Returns a dict with mIoU, pixel accuracy, mean class accuracy, per-class IoU (a name ->
    value dict, None where undefined), the confusion matrix, and with ``per_image`` each
    image's mIoU and number of ground-truth classes (for overlays), and timing:
    ``ms_per_image`` is the median over batches of (model time / images in the batch),
    after ``warmup`` untimed calls on the first batch; ``fps`` is its inverse;
    ``model_seconds`` the model calls' total (against the wall time: what the rest costs).
    The confusion matrix accumulates on ``device``, one bincount per batch.
    ``reduce(confmat)``, when given, returns the confusion matrix summed over the processes
    of a torchrun job, each of which scored its own shard of the images (the scores are
    then over the whole set; per-image lists and timings stay this process's).
    """
    model.eval()
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    per_image_scores, times, model_seconds = [], [], 0.0
    index = 0
    dtype = amp_dtype(device, amp)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, targets = to_model_input(images, targets, device)
        with autocast:
            logits, elapsed = timed_logits(model, images, device, 0 if times else warmup)
        times.append(elapsed / images.shape[0])
        model_seconds += elapsed
        if logits.shape[-2:] != targets.shape[-2:]:
            raise RuntimeError(f"model returned {tuple(logits.shape[-2:])} logits for a "
                               f"{tuple(targets.shape[-2:])} image; evaluation needs full size")
        preds = class_map(logits)
        confmat += confusion_matrix(preds, targets, num_classes, IGNORE_INDEX)
        index += images.shape[0]
        if per_image:
            per_image_scores += image_scores(preds, targets, num_classes)
    confmat = confmat.cpu()
    if reduce is not None:
        confmat = reduce(confmat)
        index = int(reduce(torch.tensor(index)))
    results = evaluation_results(confmat, index, times, model_seconds)
    if per_image:
        results["per_image_miou"] = nan_to_none([m for m, _ in per_image_scores])
        # the classes in each image's ground truth (evaluate.py's gallery skips
        # background-only images)
        results["per_image_gt_classes"] = [n for _, n in per_image_scores]
    return results


def timed_logits(model, images, device, warmup):
    """(logits, seconds) of one model call, timed between device synchronisations (CUDA and
    MPS run asynchronously), after ``warmup`` untimed calls that warm the kernels up."""
    for _ in range(warmup):
        logits_of(model(images))
    synchronize(device)
    start = time.perf_counter()
    logits = logits_of(model(images))
    synchronize(device)
    return logits, time.perf_counter() - start


def image_scores(preds, targets, num_classes):
    """[(mIoU, number of ground-truth classes)] of each image of a batch."""
    scores = []
    for pred, target in zip(preds, targets):
        cm = confusion_matrix(pred, target, num_classes, IGNORE_INDEX).cpu()
        scores.append((scores_from_confusion(cm)["miou"], int((cm.sum(1) > 0).sum())))
    return scores


def evaluation_results(confmat, num_images, times, model_seconds):
    """``evaluate``'s dict from the summed confusion matrix and the per-image model times."""
    scores = scores_from_confusion(confmat)
    num_classes = confmat.shape[0]
    names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else [str(i) for i in range(num_classes)]
    ms = 1000 * statistics.median(times) if times else float("nan")
    return {
        "miou": scores["miou"],
        "pixel_accuracy": scores["pixel_accuracy"],
        "mean_class_accuracy": scores["mean_class_accuracy"],
        "per_class_iou": dict(zip(names, nan_to_none(scores["per_class_iou"]))),
        "num_images": num_images,
        "ms_per_image": ms,
        "fps": 1000 / ms if times else float("nan"),
        "model_seconds": model_seconds,
        "confusion_matrix": confmat.tolist(),
    }


def time_interleaved(models, x, device, runs, warmup, amp_dtype=None):
    """{name: [seconds per call]}: one call of each model per round, rounds repeated.

    ``runs`` is one count for all, or {name: count}: a model with fewer runs sits out the
    last rounds (the slow teacher), the others stay interleaved.
    """
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                              enabled=amp_dtype is not None)
    runs = runs if isinstance(runs, dict) else {name: runs for name in models}
    times = {name: [] for name in models}
    with torch.inference_mode(), autocast:
        for name, model in models.items():
            for _ in range(warmup):
                logits_of(model(x))
        for r in range(max(runs.values())):
            for name, model in models.items():
                if r >= runs[name]:
                    continue
                synchronize(device)
                start = time.perf_counter()
                logits_of(model(x))
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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
                        amp=False, per_image=False, progress=True):
    """``evaluate`` plus what every evaluating script reports: print, and save the JSON."""
    model.to(device)
    results = evaluate(model, loader, device, amp=amp, desc=title, per_image=per_image,
                       progress=progress)
    results.update(params=params, device=str(device), hardware=device_name(device),
                   git=git_revision(), **(extra or {}))
    print(format_results(results, title))
    if json_path:
        save_json(results, json_path)
        print(f"results written to {json_path}")
    return results


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; carries the terms and the step for the message."""


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


def build_optimizer(name, params, lr, weight_decay, device):
    """AdamW ('adam') or SGD with momentum 0.9, updating all tensors at once: fused kernels on
    CUDA; on a CPU the foreach form, which computes the same bits as the per-tensor loop in
    0.6x its time (fused would change them; docs/benchmark.md)."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, **fast)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fast)


def forward_loss(model, criterion, images, targets, amp):
    """Forward and loss terms, nothing else: the caller checks the total, then calls
    ``step``. Returns (terms, total)."""
    with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        student, teacher = model(images)
        terms = criterion(student, targets, teacher)
        return terms, criterion.total(terms)


def step(optimizer, total, scaler):
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, scaler=None,
                    check=None, partial=None):
    """One pass over ``loader``; returns the mean of every loss term as ``loss_<name>``.

    ``model``: a ``Distiller``. ``args`` gives ``amp`` (autocast; the soft losses still
    compute in float32, losses.py), ``progress`` and ``log_every``.
    ``check(nonfinite) -> (nonfinite anywhere, stop requested anywhere)`` is called once per
    step, before the backward pass, so that every process of a torchrun job takes the same
    decision; without it only the local loss is checked. A stop raises ``Interrupted`` after
    the step, carrying the partial record that ``partial`` takes back to finish the epoch:
    its first ``step`` batches are drawn again and dropped (so the sampler and the workers'
    augmentation streams are where they were), then the random state is restored, so the
    resumed epoch is the one an unbroken run would have had.
    """
    model.train()
    amp = amp_dtype(device, args.amp)
    start, sums, batches = (partial["step"], dict(partial["sums"]), partial["batches"]) \
        if partial else (0, {}, 0)
    means = lambda: {f"loss_{name}": value / max(batches, 1) for name, value in sums.items()}
    if start >= len(loader):  # stopped after its last step: only validation is left
        set_rng_state(partial["rng"])
        return means()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not args.progress, leave=False)
    for i, (images, targets) in enumerate(bar):
        if i < start:  # replay: the batches the interrupted run had already trained on
            if i == start - 1:
                set_rng_state(partial["rng"])
            continue
        terms, total = forward_loss(model, criterion, *to_model_input(images, targets, device),
                                    amp)
        local_bad = not bool(torch.isfinite(total))
        bad, stop = check(local_bad) if check is not None else (local_bad, False)
        if bad:
            shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            where = "" if local_bad else " in another process of the job"
            raise NonFiniteLoss(f"non-finite loss{where} at epoch {epoch}, step {i + 1}/"
                                f"{len(loader)}: total={float(total.detach()):.4g} ({shown})")
        step(optimizer, total, scaler)
        batches += 1
        for name, value in list(terms.items()) + [("total", total)]:
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        bar.set_postfix(loss=f"{sums['total'] / batches:.4f}")
        if args.log_every and (i + 1) % args.log_every == 0:
            tqdm.write(f"epoch {epoch} step {i + 1}/{len(loader)} loss {sums['total'] / batches:.4f}")
        if stop:
            raise Interrupted({"epoch": epoch, "step": i + 1, "sums": sums, "batches": batches,
                               "rng": rng_state()})
    return means()
