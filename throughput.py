"""Training and evaluation throughput, measured in one process (``benchmark.py --throughput``).

- loader: training images/s through the real dataset, transforms and DataLoader
  (``data.loader`` with ``data.EpochSampler``), for VOC-size images (about 440 px JPEGs,
  crop 480, scale 0.5-2) and demo-size ones (about 96 px, crop 96, scale 0.75-1.5), with 0,
  1 and 2 workers; the first epoch starts the workers and is not timed, the fastest of the
  next ten counts;
- step: ``engine.train_one_epoch`` images/s at the demo's settings (lite student, batch 8,
  96 px crops, no workers), next to a bare loop of forward, CE, backward and AdamW on one
  in-memory batch, for no KD, response KD and response + feature KD (a random lite
  teacher); each KD step is also divided by the no-KD step (the KD cost);
- evaluation: ``engine.evaluate``'s wall time divided by the sum of its model calls
  (median of three passes);
- epoch fixed cost: validation, checkpoint and history as a share of a demo epoch, timed
  around the functions train_kd.py's epoch calls (``engine.evaluate``,
  ``checkpoints.write_history``, ``files.torch_save``), validating every epoch and every
  ``--val-every`` epochs as the demo does;
- contention (CPU): a demo epoch on the idle machine and beside one busy single-threaded
  process, with the thread count every script chooses at start, and beside it at torch's
  default count (before the choice existed).

Random weights: speed does not depend on them. The data is generated (synth.write_synth_voc).
"""
import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from checkpoints import checkpoint_state, write_history
from compute import TORCH_DEFAULT_THREADS, set_compute_resources
from data import (EpochSampler, build_dataset, eval_loader, loader,
                  to_model_input)
from distill import FrozenTeacher, build_distiller, build_optimizer, logits_of
from engine import evaluate, train_one_epoch
from files import torch_save
from losses import DistillationCriterion, cross_entropy_loss
from nets import build_model
from synth import write_synth_voc

SIZES = {"voc": {"size": 440, "crop": 480, "scale": (0.5, 2.0), "train": 48, "val": 16},
         "demo": {"size": 96, "crop": 96, "scale": (0.75, 1.5), "train": 160, "val": 150,
                  "val_every": 5}}  # demo.py's; val is its 'select' (a test holds them equal)


def make_trees(folder):
    """The two generated trees, {name: root}."""
    roots = {}
    for name, s in SIZES.items():
        roots[name] = Path(folder) / name
        write_synth_voc(roots[name], s["train"], s["val"], s["size"], seed=0, num_object_classes=4)
    return roots


def loader_rate(root, setting, workers, batch=8, timed=10):
    """Training images/s of the real loader: the fastest of ``timed`` epochs after one that
    starts the workers. The fastest, as timeit advises: on a shared machine other programs
    only ever add time, and one short epoch of 48 images can lose a third to them; ten of
    them (about 2 s at VOC size) outlast a neighbour's burst that three did not."""
    ds = build_dataset(root, "train", crop_size=setting["crop"], download=False,
                       scale=setting["scale"])
    sampler = EpochSampler(len(ds))
    batches = loader(ds, batch, sampler, workers, drop_last=True)
    rates = []
    for epoch in range(1 + timed):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(images.shape[0] for images, _ in batches)
        rates.append(count / (time.perf_counter() - start))
    return max(rates[1:])


def kd_setup(weights, teacher, student_arch="lite", lr=1e-3, device=torch.device("cpu")):
    """(Distiller, criterion, AdamW, student) for the terms ``weights``, seeded alike."""
    torch.manual_seed(0)
    student = build_model(student_arch)
    criterion = DistillationCriterion(weights)
    distiller = build_distiller(student, criterion, teacher)
    optimizer = build_optimizer("adam", distiller.trainable_parameters(), lr, 1e-4, device)
    return distiller, criterion, optimizer, student


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
    images, targets = to_model_input(*next(iter(batches)), device)
    teacher = FrozenTeacher(build_model("lite"), "lite").to(device)
    configs = {"no_kd": {}, "response_kd": {"kd": 0.5}, "response_feature_kd": {"kd": 0.5,
                                                                               "feat": 1.0}}
    rates = {}
    for name, weights in configs.items():
        model, criterion, optimizer, student = kd_setup(weights, teacher, device=device)
        model.to(device)
        loop, bare = [], []
        for epoch in range(rounds + 1):  # epoch 0 warms up; then loop and bare alternate,
            sampler.set_epoch(epoch)     # so that load on a shared machine hits both alike
            start = time.perf_counter()
            train_one_epoch(model, criterion, optimizer, batches, device, epoch, progress=False)
            loop.append(len(batches) * 8 / (time.perf_counter() - start))
            bare.append(bare_rate(student, optimizer, images, targets, len(batches)))
        rates[name] = {"loop_ips": statistics.median(loop[1:]),
                       "bare_ips": statistics.median(bare[1:]),
                       "loop_over_bare": statistics.median(b / s for s, b in zip(loop[1:], bare[1:]))}
    return rates


def eval_overhead(root, device, passes=3):
    """engine.evaluate's wall time / the sum of its model calls: the median of ``passes``
    passes after a warm-up pass."""
    model = build_model("lite").to(device)
    val = eval_loader(root, download=False)
    ratios = []
    for _ in range(passes + 1):
        start = time.perf_counter()
        result = evaluate(model, val, device, warmup=0, progress=False)
        ratios.append((time.perf_counter() - start) / result["model_seconds"])
    return statistics.median(ratios[1:])


def epoch_parts(root, folder, device, epochs=3):
    """Median seconds of a demo epoch's parts, timed around the functions train_kd.py's
    epoch calls: {'train', 'validation', 'checkpoint', 'history'} (after a warm-up epoch)."""
    s = SIZES["demo"]
    ds = build_dataset(root, "train", crop_size=s["crop"], download=False, scale=s["scale"])
    sampler = EpochSampler(len(ds))
    batches, val = loader(ds, 8, sampler, 0, drop_last=True), eval_loader(root, download=False)
    model, criterion, optimizer, student = kd_setup({}, None, device=device)
    model.to(device)
    records, path, parts = [], Path(folder) / "fixed", []
    for epoch in range(epochs + 1):
        sampler.set_epoch(epoch)
        t = [time.perf_counter()]
        losses = train_one_epoch(model, criterion, optimizer, batches, device, epoch,
                                 progress=False)
        t.append(time.perf_counter())
        scores = evaluate(student, val, device, warmup=0, progress=False)
        t.append(time.perf_counter())
        torch_save(checkpoint_state(student, None, optimizer, None, None, epoch,
                                    {"amp": False}, scores["miou"]), path / "last.pth")
        t.append(time.perf_counter())
        records.append({"epoch": epoch, **losses, "val_miou": scores["miou"]})
        write_history(records, path / "history.jsonl")
        t.append(time.perf_counter())
        parts.append([b - a for a, b in zip(t, t[1:])])
    names = ("train", "validation", "checkpoint", "history")
    return {name: statistics.median(p[i] for p in parts[1:]) for i, name in enumerate(names)}


def fixed_share(parts, val_every):
    """The fixed cost's share of an epoch that validates every ``val_every`` epochs."""
    fixed = parts["validation"] / val_every + parts["checkpoint"] + parts["history"]
    return fixed / (parts["train"] + fixed)


@contextlib.contextmanager
def busy_process():
    """One single-threaded program keeping a core busy (a student's other work) meanwhile."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)  # running at full speed before anyone measures the load
        yield proc
    finally:
        proc.kill()
        proc.wait()


def epoch_seconds(root, device, threads, epochs=2):
    """Median seconds of a demo epoch (no KD) at ``threads`` threads, after a warm-up."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = SIZES["demo"]
        ds = build_dataset(root, "train", crop_size=s["crop"], download=False, scale=s["scale"])
        sampler = EpochSampler(len(ds))
        batches = loader(ds, 8, sampler, 0, drop_last=True)
        model, criterion, optimizer, _ = kd_setup({}, None, device=device)
        seconds = []
        for epoch in range(epochs + 1):
            sampler.set_epoch(epoch)
            start = time.perf_counter()
            train_one_epoch(model.to(device), criterion, optimizer, batches, device, epoch,
                            progress=False)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds[1:])
    finally:
        torch.set_num_threads(before)


def contention(root, device):
    """A CPU training run on the idle machine and beside one busy process, with the thread
    count chosen as every script chooses it at start (compute.set_compute_resources), and, for
    comparison, beside it at torch's default count (what the scripts used before)."""
    auto = lambda: set_compute_resources(argparse.Namespace(threads=None, workers=0), device)
    before = torch.get_num_threads()
    auto()
    idle_threads = torch.get_num_threads()
    idle = epoch_seconds(root, device, idle_threads)
    with busy_process():
        auto()
        busy_threads = torch.get_num_threads()
        busy = epoch_seconds(root, device, busy_threads)
        busy_default = epoch_seconds(root, device, TORCH_DEFAULT_THREADS)
    torch.set_num_threads(before)
    return {"idle_threads": idle_threads, "idle_seconds": idle, "busy_threads": busy_threads,
            "busy_seconds": busy, "busy_over_idle": busy / idle,
            "default_threads": TORCH_DEFAULT_THREADS, "busy_default_seconds": busy_default,
            "busy_default_over_idle": busy_default / idle}


def measure(device):
    """Every measurement of the module docstring, as one dict."""
    with tempfile.TemporaryDirectory() as folder:
        roots = make_trees(folder)
        parts = epoch_parts(roots["demo"], folder, device)
        result = {"loader_ips": {name: {str(w): loader_rate(roots[name], SIZES[name], w)
                                        for w in (0, 1, 2)} for name in SIZES},
                  "step": step_rates(roots["demo"], device),
                  "eval_wall_over_model": {name: eval_overhead(roots[name], device)
                                           for name in SIZES},
                  "epoch_parts": parts,
                  "epoch_fixed_share": {str(n): fixed_share(parts, n)
                                        for n in sorted({1, SIZES["demo"]["val_every"]})}}
        if device.type == "cpu":
            result["contention"] = contention(roots["demo"], device)
    base = result["step"]["no_kd"]["loop_ips"]
    for rates in result["step"].values():
        rates["kd_cost"] = base / rates["loop_ips"]
    return result
