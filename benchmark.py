"""Size and speed of the teacher and the students, measured side by side in one process.

For each model: parameters (inference, and total with the training-only feature adapters
of the students), GFLOPs (torch.utils.flop_counter), checkpoint size on disk, latency at
batch 1 (median and p90), throughput at batch --batch (images/s) and peak memory of one
batch-1 forward. The models are timed interleaved (run r of every model, then run r+1),
after warm-up and with device synchronisation, so background load on a shared machine hits
them alike and the ratios stay meaningful. Weights are random: speed does not depend on them.

Models above --slow-gflops (the teacher) get --slow-runs timed calls instead of --runs, and
--slow-batch-runs at batch --batch, so the whole CPU benchmark stays within a few minutes.
Peak memory: on CUDA torch.cuda.max_memory_allocated minus what was allocated before the
call; on CPU and MPS the peak of live tensor bytes created during the forward, tracked op by
op with a TorchDispatchMode (activations and outputs; weights and the input excluded, and
allocator overhead and library scratch buffers not seen), so it is an estimate.

    python benchmark.py --device cpu
    python benchmark.py --device cuda --size 520 --runs 50 --json outputs/benchmark_cuda.json
    python benchmark.py --models lite lraspp_mobilenet_v3_large --threads 1
    python benchmark.py --models models/X_last.pth models/compressed/X_last_pruned_channels_0.5.pth
    python benchmark.py --device cpu --json out.json   # also writes out.md (the table)
    python benchmark.py --train-cost --size 256 --runs 10   # KD step: every term vs Hinton
"""
import argparse
import functools
import os
import statistics
import tempfile
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from cli import HelpFormatter, UserError, git_revision, markdown_table, run_cli
from compute import (add_compute_flags, amp_dtype, count_params, device_name,
                     percentile, resolve_device, set_compute_resources,
                     synchronize, time_interleaved, timed)
from distill import FeatureAdapters, FrozenTeacher, feature_channels, logits_of
from files import save_json
from nets import STUDENT_ARCHS, TORCHVISION_ARCHS, build_model
from runtimes import FORMATS, load_any, model_format


def model_or_checkpoint(value):
    """--models entry: a known architecture name, or a model file to open."""
    if value in STUDENT_ARCHS + TORCHVISION_ARCHS or Path(value).suffix in FORMATS:
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither a model ({', '.join(STUDENT_ARCHS + TORCHVISION_ARCHS)}) nor a "
        "model file (.pth checkpoint, int8 .pt2, .onnx); pass one of those")


class OneAtATime(torch.nn.Module):
    """A batch through a model compiled or exported for batch 1: one image after another."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.cat([logits_of(self.model(x[i:i + 1])) for i in range(len(x))])


def load_benchmarked(name, device):
    """(model, record) for a --models entry: random weights by name (record None), or a
    model file through runtimes.load_any (its record: 'format', 'params', ...)."""
    if Path(name).suffix not in FORMATS:
        return build_model(name, pretrained=False), None
    if model_format(name) != "checkpoint" and device.type != "cpu":
        raise UserError(f"{name}: a {model_format(name)} model runs on the CPU only; benchmark "
                        "it with --device cpu")
    model, record = load_any(name)
    return (model if record["format"] == "checkpoint" else OneAtATime(model)), record


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+",
                        default=["fcn_resnet50", "lab", "lite", "lraspp_mobilenet_v3_large",
                                 "deeplabv3_mobilenet_v3_large"],
                        type=model_or_checkpoint, metavar="NAME|PATH",
                        help="models to measure, by name (random weights) or as a model file "
                             "PATH of this repo (its own weights): a .pth checkpoint, a pruned "
                             "one included, or compress.py's int8 .pt2 / .onnx (CPU; at --batch "
                             "their images run one at a time); the first is the reference for "
                             "speed-ups")
    add_compute_flags(parser, device="cpu", workers=False)
    parser.add_argument("--size", type=int, default=520, help="square input side in pixels")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model first")
    parser.add_argument("--batch", type=int, default=8, help="batch of the throughput runs")
    parser.add_argument("--batch-runs", type=int, default=3,
                        help="timed calls per model at --batch (throughput)")
    parser.add_argument("--slow-gflops", type=float, default=50.0,
                        help="models above this many GFLOPs at batch 1 get the --slow-* run counts")
    parser.add_argument("--slow-runs", type=int, default=4,
                        help="timed batch-1 calls of a slow model (the teacher)")
    parser.add_argument("--slow-batch-runs", type=int, default=1,
                        help="timed calls at --batch of a slow model")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--amp", action="store_true",
                        help="autocast (fp16 on CUDA/MPS, bf16 on CPU)")
    parser.add_argument("--json", default="outputs/benchmark.json",
                        help="results JSON; the Markdown table goes next to it as .md")
    # training cost of the distillation terms (instead of the inference benchmark)
    parser.add_argument("--train-cost", action="store_true",
                        help="time a full KD training step (teacher fcn_resnet50, student lite, "
                             "batch --train-batch at --size): Hinton-only vs every term on; "
                             "try --size 256")
    parser.add_argument("--train-batch", type=int, default=2, help="batch of --train-cost steps")
    parser.add_argument("--train-cost-json", default="outputs/benchmark_train_cost.json",
                        help="results JSON of --train-cost")
    # training and evaluation throughput (instead of the inference benchmark)
    parser.add_argument("--throughput", action="store_true",
                        help="loader images/s per worker, training loop against a bare loop, "
                             "evaluation against its model time, the epoch's fixed cost "
                             "(throughput.py)")
    parser.add_argument("--throughput-json", default="outputs/benchmark_throughput.json",
                        help="results JSON of --throughput; its tables go next to it as .md")
    return parser


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once among those created by the ops run inside.

    A CPU stand-in for torch.cuda.max_memory_allocated: each op's outputs are recorded
    (views and in-place results share a storage and count once), and storages are dropped
    from the tally when Python frees them. Weights and inputs made outside are not counted.
    """

    def __enter__(self):
        self.live, self.current, self.peak = {}, 0, 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= size
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in self.live and storage.nbytes() > 0:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure_once(model, x, device):
    """(GFLOPs, peak MB) of one forward: flops from torch's counter, memory as documented."""
    counter = FlopCounterMode(display=False)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with counter, torch.inference_mode():
            logits_of(model(x))
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        tracker = LiveTensorPeak()
        with counter, tracker, torch.inference_mode():
            logits_of(model(x))
        peak = tracker.peak
    return counter.get_total_flops() / 1e9, peak / 2 ** 20


def checkpoint_bytes(model):
    """Size on disk of the model's state dict as torch.save writes it (a temporary file)."""
    fd, path = tempfile.mkstemp(suffix=".pth")
    os.close(fd)
    try:
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)
    finally:
        os.remove(path)


def total_params(name, model):
    """Inference parameters plus, for a compact student, its training-only FeatureAdapters
    from its own tap widths (narrower when pruned) to the teacher's (fcn_resnet50); other
    models have nothing training-only, total = inference."""
    if getattr(model, "model_args", {}).get("arch") not in STUDENT_ARCHS:
        return count_params(model)
    adapters = FeatureAdapters(model.feature_channels, feature_channels("fcn_resnet50"))
    return count_params(model) + count_params(adapters)


def optional(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(rows, reference, batch=8):
    header = ["model", "params (inference)", "params (total)", "GFLOPs", "checkpoint MB",
              "median ms", "p90 ms", f"images/s at batch {batch}", "peak MB",
              f"speed-up vs {reference}"]
    return markdown_table(header, [
        [r["model"], f"{r['params']:,}", f"{r['params_total']:,}", optional(r["gflops"], ".2f"),
         f"{r['checkpoint_mb']:.2f}", f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}",
         f"{r['throughput_ips']:.2f}", optional(r["peak_mem_mb"], ".0f"), f"{r['speedup']:.1f}x"]
        for r in rows])


def train_step_cost(device, size=256, batch=2, runs=10, warmup=2, teacher_arch="fcn_resnet50",
                    student_arch="lite"):
    """{config: [seconds per training step]} for Hinton-only and every-term-on KD.

    A step is ``engine.train_one_epoch`` over one batch: teacher forward (one pass for its
    logits and all taps), student forward and backward, optimizer step, the loss values read
    back. The two configurations run interleaved (step r of each, then r+1) after warm-up.
    """
    from engine import train_one_epoch
    from throughput import kd_setup

    torch.manual_seed(0)
    teacher = FrozenTeacher(build_model(teacher_arch), teacher_arch, preact=True).to(device)
    configs = {"hinton": {"kd": 0.5},
               "all_terms": {"kd": 0.5, "feat": 1.0, "pixel": 100.0, "pair": 1.0, "at": 1000.0,
                             "cwd": 3.0}}
    steps = {}
    # a uint8 batch, as the loader sends it (train_one_epoch normalises on the device)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 21, (batch, size, size), dtype=torch.uint8, device=device)
    for name, weights in configs.items():
        model, criterion, optimizer, _ = kd_setup(weights, teacher, student_arch, 1e-4, device)
        steps[name] = functools.partial(train_one_epoch, model.to(device), criterion, optimizer,
                                        [(x, y)], device, 0, progress=False)
    times = {name: [] for name in configs}
    for r in range(warmup + runs):
        for name, one_step in steps.items():
            seconds = timed(one_step, device)[1]
            if r >= warmup:
                times[name].append(seconds)
    return times


def train_cost_main(args, device):
    """--train-cost: print and save the all-terms / Hinton-only step-time ratio."""
    print(f"device: {device} ({device_name(device)}), training step: batch {args.train_batch} at "
          f"{args.size}x{args.size}, teacher fcn_resnet50, student lite")
    times = train_step_cost(device, args.size, args.train_batch, args.runs, args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["all_terms"] / medians["hinton"]
    # the ratio within each round too: load that shifts between rounds cancels out
    paired = statistics.median(a / h for a, h in zip(times["all_terms"], times["hinton"]))
    print(f"median step: Hinton only {1000 * medians['hinton']:.1f} ms | every term on "
          f"{1000 * medians['all_terms']:.1f} ms | ratio {ratio:.3f} (median per-round ratio "
          f"{paired:.3f})")
    result = {"device": str(device), "hardware": device_name(device), "size": args.size,
              "batch": args.train_batch, "runs": args.runs, "threads": torch.get_num_threads(),
              "teacher": "fcn_resnet50", "student": "lite",
              "all_terms": "alpha 0.5, beta 1, pixel 100, pair 1, at 1000, cwd 3",
              "median_ms": {k: 1000 * v for k, v in medians.items()}, "ratio": ratio,
              "paired_ratio": paired,
              "times_ms": {k: [1000 * t for t in v] for k, v in times.items()}}
    if args.train_cost_json:
        save_json(result, args.train_cost_json)
        print(f"results written to {args.train_cost_json}")
    return result


# the targets of the throughput issue, shown beside what was measured
TARGETS = {"loader": 150, "loop_over_bare": 1.15, "eval": 1.2, "fixed": 0.10, "contention": 1.5}


def throughput_tables(r):
    """The --throughput result as Markdown tables, each with its target."""
    loader = markdown_table(
        ["images", "workers", "images/s", "images/s per worker"],
        [[name, w, f"{ips:.1f}", f"{ips / max(int(w), 1):.1f}"]
         for name, rates in r["loader_ips"].items() for w, ips in rates.items()])
    step = markdown_table(
        ["training (demo settings)", "train_one_epoch images/s", "bare loop images/s",
         "loop / bare", "step / no-KD step"],
        [[name, f"{s['loop_ips']:.1f}", f"{s['bare_ips']:.1f}", f"{s['loop_over_bare']:.2f}x",
          f"{s['kd_cost']:.2f}x"] for name, s in r["step"].items()])
    evaluation = markdown_table(
        ["evaluation", "wall time / model time"],
        [[name, f"{v:.2f}x"] for name, v in r["eval_wall_over_model"].items()])
    fixed = markdown_table(
        ["validating every", "fixed share of an epoch"],
        [[f"{n} epoch(s)", f"{100 * v:.1f}%"] for n, v in r["epoch_fixed_share"].items()])
    parts = [f"Loader (target: {TARGETS['loader']} VOC-size images/s per worker)", loader,
             f"Training loop (target: at most {TARGETS['loop_over_bare']}x the bare loop)", step,
             f"Evaluation (target: at most {TARGETS['eval']}x its model time at VOC size)",
             evaluation,
             f"Epoch fixed cost: validation, checkpoint and history (target: under "
             f"{100 * TARGETS['fixed']:.0f}% of a demo epoch)", fixed]
    if "contention" in r:
        parts += [f"A CPU training epoch beside one busy process (target: at most "
                  f"{TARGETS['contention']}x the idle epoch)", contention_table(r["contention"])]
    return "\n\n".join(parts)


def contention_table(c):
    return markdown_table(
        ["machine", "threads", "epoch seconds", "/ idle"],
        [["idle", f"{c['idle_threads']} (auto)", f"{c['idle_seconds']:.2f}", "1.00x"],
         ["one busy process", f"{c['busy_threads']} (auto)", f"{c['busy_seconds']:.2f}",
          f"{c['busy_over_idle']:.2f}x"],
         ["one busy process", f"{c['default_threads']} (torch's default)",
          f"{c['busy_default_seconds']:.2f}", f"{c['busy_default_over_idle']:.2f}x"]])


def throughput_main(args, device):
    """--throughput: measure (throughput.measure), print and save the JSON and its tables."""
    import throughput
    print(f"device: {device} ({device_name(device)}), {torch.get_num_threads()} threads")
    result = throughput.measure(device)
    tables = throughput_tables(result)
    print(tables)
    command = "python benchmark.py --throughput" + (f" --device {args.device}"
                                                    if args.device != "cpu" else "")
    result.update(device=str(device), hardware=device_name(device), command=command,
                  threads=torch.get_num_threads(), targets=TARGETS, git=git_revision(),
                  table_markdown=tables)
    save_json(result, args.throughput_json)
    md = os.path.splitext(args.throughput_json)[0] + ".md"
    Path(md).write_text(f"`{command}` on {result['hardware']}\n\n{tables}\n")
    print(f"results written to {args.throughput_json} and {md}")
    return result


def main(args):
    device = resolve_device(args.device)
    print(set_compute_resources(args, device))
    if args.train_cost:
        return train_cost_main(args, device)
    if args.throughput:
        return throughput_main(args, device)
    return inference_main(args, device)


def result_row(name, model, record, measured, times, batch_times, ref_median, batch):
    """One model's row: size from its file or state dict, speed from its timed calls."""
    record = record or {"format": "checkpoint"}
    median = statistics.median(times)
    size = checkpoint_bytes(model) if record["format"] == "checkpoint" else os.path.getsize(name)
    return {"model": name, "format": record["format"],
            "params": record.get("params") or count_params(model),
            "params_total": record.get("params") or total_params(name, model),
            "gflops": measured[0], "checkpoint_bytes": size, "checkpoint_mb": size / 2 ** 20,
            "median_ms": 1000 * median, "p90_ms": 1000 * percentile(times, 0.9),
            "speedup": ref_median / median,
            "throughput_ips": batch / statistics.median(batch_times),
            "peak_mem_mb": measured[1], "times_ms": [1000 * t for t in times],
            "batch_times_ms": [1000 * t for t in batch_times]}


def inference_main(args, device):
    """Size and speed of each model (the module docstring), side by side."""
    print(f"device: {device} ({device_name(device)}), input 1x3x{args.size}x{args.size}")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(1, 3, args.size, args.size, device=device).to(memory_format=memory_format)
    models, records = {}, {}
    for name in args.models:
        torch.manual_seed(0)
        model, records[name] = load_benchmarked(name, device)
        models[name] = model.eval().to(device, memory_format=memory_format)
    # an int8 or ONNX model's kernels run outside PyTorch's dispatcher: no FLOPs or peak
    # memory counted op by op (None, shown as '-')
    measured = {name: measure_once(model, x, device) if records[name] is None or
                records[name]["format"] == "checkpoint" else (None, None)
                for name, model in models.items()}
    slow = {name for name, (flops, _) in measured.items() if (flops or 0) > args.slow_gflops}
    runs = {name: args.slow_runs if name in slow else args.runs for name in models}
    batch_runs = {name: args.slow_batch_runs if name in slow else args.batch_runs for name in models}
    amp = amp_dtype(device, args.amp)
    times = time_interleaved(models, x, device, runs, args.warmup, amp)
    xb = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=memory_format)
    # one warm-up call at the new batch size: buffers and kernels are chosen per shape
    batch_times = time_interleaved(models, xb, device, batch_runs, 1, amp)
    reference = args.models[0]
    ref_median = statistics.median(times[reference])
    rows = [result_row(name, model, records[name], measured[name], times[name],
                       batch_times[name], ref_median, args.batch)
            for name, model in models.items()]
    for row in rows:
        row.update(runs=runs[row["model"]], batch_runs=batch_runs[row["model"]])
    table = markdown(rows, reference, args.batch)
    print(table)
    memory_method = ("torch.cuda.max_memory_allocated minus the memory allocated before the call"
                     if device.type == "cuda" else
                     "peak live tensor storage created during the forward (TorchDispatchMode); "
                     "weights, input, allocator overhead and library scratch excluded")
    result = {"device": str(device), "hardware": device_name(device), "size": args.size,
              "batch": 1, "throughput_batch": args.batch, "runs": args.runs,
              "slow_models": sorted(slow), "threads": torch.get_num_threads(),
              "channels_last": args.channels_last, "amp": args.amp, "reference": reference,
              "peak_memory_method": memory_method,
              "params_total_note": "students: inference parameters + training-only FeatureAdapters "
                                   "to fcn_resnet50's widths; others: equal to inference",
              "rows": rows, "table_markdown": table}
    if args.json:
        save_json(result, args.json)
        md_path = os.path.splitext(args.json)[0] + ".md"
        Path(md_path).write_text(
            f"Benchmark on {result['hardware']} ({device}), input {args.size}x{args.size}; "
            f"latency at batch 1, throughput at batch {args.batch}.\n\n{table}\n")
        print(f"results written to {args.json} and {md_path}")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
