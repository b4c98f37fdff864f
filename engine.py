"""The two loops under every script: one evaluation for teacher and student, one training epoch.

``evaluate`` runs a model over a loader of full-resolution images, accumulates one
confusion matrix over the whole set, and times the model calls alone (warm-up, device
synchronisation, median), apart from data loading and metric work; ``evaluate_and_report``
adds what every evaluating script prints and saves. ``train_one_epoch`` trains a
``distill.Distiller`` against a ``losses.DistillationCriterion`` with at most one host
synchronisation per step (``StepCheck``, ``LossSums``), and can finish an epoch that a
stop interrupted (checkpoints.py).
"""
import contextlib
import statistics

import torch
from tqdm import tqdm

from checkpoints import Interrupted, rng_state, set_rng_state
from cli import git_revision
from compute import amp_dtype, device_name, timed
from data import IGNORE_INDEX, VOC_CLASSES, to_model_input
from distill import logits_of, unwrapped
from files import save_json
from metrics import confusion_matrix, nan_to_none, scores_from_confusion


def class_map(logits):
    """Each pixel's class: the argmax over dimension 1. ``max(1).indices`` is the same (the
    first maximum on ties) and much faster than ``argmax(1)`` on NCHW logits on a CPU
    (docs/benchmark.md, "Evaluation")."""
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
            logits, elapsed = timed(lambda: logits_of(model(images)), device,
                                    0 if times else warmup)
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


class StepCheck:
    """Asked once per step, before the backward pass: is the loss non-finite, or has a stop
    been requested, in this process or in any other of a torchrun job?

    The answer costs one host synchronisation: the finite test is read back alone in a
    single process, or travels with the stop flag in one all-reduce under torchrun
    (``world``, a ``compute.Distributed``), so every process takes the same decision.
    ``stop`` is a ``files.StopRequest`` (its ``signum`` is set by the signal handler).
    """

    def __init__(self, stop=None, world=None):
        self.stop = stop
        self.world = world if world is not None and world.enabled else None

    def __call__(self, total):
        """(non-finite anywhere, stop requested anywhere)."""
        requested = self.stop is not None and self.stop.signum is not None
        if self.world is None:
            return not bool(torch.isfinite(total)), requested
        flags = torch.stack([~torch.isfinite(total.detach()),
                             torch.tensor(requested, device=total.device)])
        return tuple(self.world.any_of(flags))


class LossSums:
    """The running sums of the loss terms, kept on the device so that no step waits for them;
    read (one synchronisation) at the log interval and at the epoch end.

    float64 where the device has it (not MPS), so the means are those of adding each step's
    float32 values in double precision. ``sums`` and ``batches`` continue a partial epoch.
    """

    def __init__(self, device, sums=None, batches=0):
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.names = list(sums or {})
        self.values = torch.tensor(list((sums or {}).values()), dtype=self.dtype, device=device)
        self.batches = batches

    def add(self, terms, total):
        names = list(terms) + ["total"]
        if not self.names:
            self.names, self.values = names, torch.zeros(len(names), dtype=self.dtype,
                                                         device=self.values.device)
        elif names != self.names:
            raise ValueError(f"loss terms {names} differ from the epoch's {self.names}")
        with torch.no_grad():  # no autograd records: one stack, one add
            self.values += torch.stack((*terms.values(), total))
        self.batches += 1

    def read(self):
        """{term: sum} as Python floats (the host waits here)."""
        return dict(zip(self.names, self.values.tolist()))

    def means(self):
        return {f"loss_{name}": value / max(self.batches, 1) for name, value in self.read().items()}


def forward_loss(model, criterion, images, targets, amp):
    """Forward and loss terms, nothing else: the caller checks the total, then calls
    ``backward_and_step``. Returns (terms, total)."""
    with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        student, teacher = model(images)
        terms = criterion(student, targets, teacher)
        return terms, criterion.total(terms)


def backward_and_step(optimizer, total, scaler):
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()


def non_finite_message(terms, total, epoch, i, steps):
    """The error of a non-finite loss; read only then, so it may wait on the device."""
    where = "" if not bool(torch.isfinite(total)) else " in another process of the job"
    shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
    return (f"non-finite loss{where} at epoch {epoch}, step {i + 1}/{steps}: "
            f"total={float(total.detach()):.4g} ({shown})")


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, amp=None, scaler=None,
                    log_every=0, progress=True, stop_check=None, partial=None, average=None):
    """One pass over ``loader``; returns the mean of every loss term as ``loss_<name>``.

    ``model``: a ``distill.Distiller``. ``amp``: the autocast dtype (``compute.amp_dtype``)
    or None for float32; the soft losses still compute in float32 (losses.py).
    ``log_every``: print the running loss every N steps (0: never); the progress bar shows
    it there too, or every 25 steps without step logs. ``stop_check``: a ``StepCheck``
    (default: this process's loss only, no stop). A stop raises ``Interrupted`` after the
    step, carrying the partial record that ``partial`` takes back to finish the epoch:
    its first ``step`` batches are drawn again and dropped (so the sampler and the workers'
    augmentation streams are where they were), then the random state is restored, so the
    resumed epoch is the one an unbroken run would have had. ``average``: the student's
    weight average (``distill.build_weight_average``), updated after every step.
    """
    model.train()
    stop_check = stop_check or StepCheck()
    first = partial["step"] if partial else 0
    sums = LossSums(device, *((partial["sums"], partial["batches"]) if partial else ()))
    if first >= len(loader):  # stopped after its last step: only validation is left
        set_rng_state(partial["rng"])
        return sums.means()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
    show_every = log_every or 25
    for i, (images, targets) in enumerate(bar):
        if i < first:  # replay: the batches the interrupted run had already trained on
            if i == first - 1:
                set_rng_state(partial["rng"])
            continue
        terms, total = forward_loss(model, criterion, *to_model_input(images, targets, device),
                                    amp)
        bad, stop = stop_check(total)  # the step's one host synchronisation
        if bad:
            raise NonFiniteLoss(non_finite_message(terms, total, epoch, i, len(loader)))
        backward_and_step(optimizer, total, scaler)
        if average is not None:
            average.update_parameters(unwrapped(model.student))
        sums.add(terms, total)
        if (i + 1) % show_every == 0 and (progress or log_every):
            mean = sums.read()["total"] / sums.batches
            bar.set_postfix(loss=f"{mean:.4f}")
            if log_every:
                tqdm.write(f"epoch {epoch} step {i + 1}/{len(loader)} loss {mean:.4f}")
        if stop:
            raise Interrupted({"epoch": epoch, "step": i + 1, "sums": sums.read(),
                               "batches": sums.batches, "rng": rng_state()})
    return sums.means()
