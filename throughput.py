"""Training and evaluation throughput, measured in one process (``benchmark.py --throughput``).

- loader: training images/s through the real dataset, transforms and DataLoader
  (``data.loader`` with ``data.EpochSampler``), for VOC-size images (about 440 px JPEGs,
  crop 480, scale 0.5-2) and demo-size ones (about 96 px, crop 96, scale 0.75-1.5), with 0,
  1 and 2 workers; the first epoch starts the workers and is not timed;
- step: ``engine.train_one_epoch`` images/s at the demo's settings (lite student, batch 8,
  96 px crops, no workers), next to a bare loop of forward, CE, backward and AdamW on one
  in-memory batch, for no KD, response KD and response + feature KD (a random lite
  teacher); each KD step is also divided by the no-KD step (the KD cost);
- evaluation: ``engine.evaluate``'s wall time divided by the sum of its model calls;
- epoch fixed cost: validation, checkpoint and history as a share of a demo epoch, timed
  around the functions train_kd.py's epoch calls (``engine.evaluate``,
  ``checkpoints.write_history``, ``utils.torch_save``).

Random weights: speed does not depend on them. The data is generated (data.write_synth_voc).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from checkpoints import checkpoint_state, write_history
from data import EpochSampler, build_dataset, eval_loader, loader, write_synth_voc
from engine import Distiller, evaluate, logits_of, train_one_epoch
from losses import DistillationCriterion, cross_entropy_loss
from nets import FrozenTeacher, build_model
from student_model import FeatureAdapters
from utils import torch_save

SIZES = {"voc": {"size": 440, "crop": 480, "scale": (0.5, 2.0), "train": 48, "val": 8},
         "demo": {"size": 96, "crop": 96, "scale": (0.75, 1.5), "train": 160, "val": 40}}  # demo.py's
QUIET = argparse.Namespace(amp=False, progress=False, log_every=0)


def make_trees(folder):
    """The two generated trees, {name: root}."""
    roots = {}
    for name, s in SIZES.items():
        roots[name] = Path(folder) / name
        write_synth_voc(roots[name], s["train"], s["val"], s["size"], seed=0, num_object_classes=4)
    return roots


def loader_rate(root, setting, workers, batch=8):
    """Training images/s of the real loader; the second of two epochs is timed."""
    ds = build_dataset(root, "train", crop_size=setting["crop"], download=False,
                       scale=setting["scale"])
    sampler = EpochSampler(len(ds))
    batches = loader(ds, batch, sampler, workers, drop_last=True)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(images.shape[0] for images, _ in batches)
    return count / (time.perf_counter() - start)


def kd_setup(weights, teacher, student_arch="lite", lr=1e-3):
    """(Distiller, criterion, AdamW, student) for the terms ``weights``, seeded alike."""
    torch.manual_seed(0)
    student = build_model(student_arch)
    criterion = DistillationCriterion(weights)
    adapters = FeatureAdapters(student.FEATURE_CHANNELS, teacher.channels) \
        if "adapted" in criterion.needs() else None
    params = list(student.parameters()) + (list(adapters.parameters()) if adapters else [])
    return (Distiller(student, criterion, teacher, adapters), criterion,
            torch.optim.AdamW(params, lr=lr), student)


def bare_rate(student, optimizer, images, targets, steps):
    """Forward, CE, backward and the optimizer step on one in-memory batch: the floor."""
    student.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = cross_entropy_loss(logits_of(student(images)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * images.shape[0] / (time.perf_counter() - start)


def step_rates(root, device, rounds=3):
    """{config: {'loop_ips', 'bare_ips', 'loop_over_bare'}} at the demo's settings, medians
    over ``rounds`` alternations of an epoch and as many bare steps."""
    s = SIZES["demo"]
    ds = build_dataset(root, "train", crop_size=s["crop"], download=False, scale=s["scale"])
    sampler = EpochSampler(len(ds))
    batches = loader(ds, 8, sampler, 0, drop_last=True)
    images, targets = (t.to(device) for t in next(iter(batches)))
    teacher = FrozenTeacher(build_model("lite"), "lite").to(device)
    configs = {"no_kd": {}, "response_kd": {"kd": 0.5}, "response_feature_kd": {"kd": 0.5,
                                                                               "feat": 1.0}}
    rates = {}
    for name, weights in configs.items():
        model, criterion, optimizer, student = kd_setup(weights, teacher)
        model.to(device)
        loop, bare = [], []
        for epoch in range(rounds + 1):  # epoch 0 warms up; then loop and bare alternate,
            sampler.set_epoch(epoch)     # so that load on a shared machine hits both alike
            start = time.perf_counter()
            train_one_epoch(model, criterion, optimizer, batches, device, epoch, QUIET)
            loop.append(len(batches) * 8 / (time.perf_counter() - start))
            bare.append(bare_rate(student, optimizer, images, targets, len(batches)))
        rates[name] = {"loop_ips": statistics.median(loop[1:]),
                       "bare_ips": statistics.median(bare[1:]),
                       "loop_over_bare": statistics.median(b / s for s, b in zip(loop[1:], bare[1:]))}
    return rates


def eval_overhead(root, device):
    """engine.evaluate's wall time / the sum of its model calls (second of two passes)."""
    model = build_model("lite").to(device)
    val = eval_loader(root, download=False)
    for _ in range(2):
        start = time.perf_counter()
        result = evaluate(model, val, device, warmup=0, progress=False)
        wall = time.perf_counter() - start
    return wall / result["model_seconds"]


def epoch_fixed_share(root, folder, device):
    """(validation + checkpoint + history) / epoch time at the demo's settings, with the
    functions train_kd.py's epoch calls (the second of two epochs)."""
    s = SIZES["demo"]
    ds = build_dataset(root, "train", crop_size=s["crop"], download=False, scale=s["scale"])
    sampler = EpochSampler(len(ds))
    batches, val = loader(ds, 8, sampler, 0, drop_last=True), eval_loader(root, download=False)
    model, criterion, optimizer, student = kd_setup({}, None)
    model.to(device)
    records, path = [], Path(folder) / "fixed"
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        losses = train_one_epoch(model, criterion, optimizer, batches, device, epoch, QUIET)
        trained = time.perf_counter()
        scores = evaluate(student, val, device, warmup=0, progress=False)
        records.append({"epoch": epoch, **losses, "val_miou": scores["miou"]})
        write_history(records, path / "history.jsonl")
        torch_save(checkpoint_state(student, None, optimizer, None, None, epoch, QUIET,
                                    scores["miou"]), path / "last.pth")
        end = time.perf_counter()
    return (end - trained) / (end - start)


def measure(device):
    """Every measurement of the module docstring, as one dict."""
    with tempfile.TemporaryDirectory() as folder:
        roots = make_trees(folder)
        result = {"loader_ips": {name: {str(w): loader_rate(roots[name], SIZES[name], w)
                                        for w in (0, 1, 2)} for name in SIZES},
                  "step": step_rates(roots["demo"], device),
                  "eval_wall_over_model": {name: eval_overhead(roots[name], device)
                                           for name in SIZES},
                  "epoch_fixed_share": epoch_fixed_share(roots["demo"], folder, device)}
    base = result["step"]["no_kd"]["loop_ips"]
    for rates in result["step"].values():
        rates["kd_cost"] = base / rates["loop_ips"]
    return result
