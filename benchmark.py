"""Size and speed of the teacher and the students, measured side by side in one process.

For each model: inference parameters, GFLOPs (torch.utils.flop_counter) and latency at
batch 1, median and p90. The models are timed interleaved (run r of every model, then run
r+1), after warm-up and with device synchronisation, so background load on a shared machine
hits them alike and the ratios stay meaningful. Weights are random: speed does not depend
on them.

    python benchmark.py --device cpu
    python benchmark.py --device cuda --size 520 --runs 50 --json outputs/benchmark_cuda.json
    python benchmark.py --models lite lraspp_mobilenet_v3_large --threads 1
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine import logits_of
from nets import STUDENT_ARCHS, TORCHVISION_ARCHS, build_model
from utils import count_params, device_name, resolve_device, run_cli, save_json, synchronize


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+",
                        default=["fcn_resnet50", "lab", "lite", "lraspp_mobilenet_v3_large"],
                        choices=STUDENT_ARCHS + TORCHVISION_ARCHS,
                        help="models to measure; the first is the reference for speed-ups")
    parser.add_argument("--device", default="cpu", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--size", type=int, default=520, help="square input side in pixels")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per model first")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--amp", action="store_true",
                        help="autocast (fp16 on CUDA/MPS, bf16 on CPU)")
    parser.add_argument("--json", default="outputs/benchmark.json", help="results JSON")
    return parser


def gflops(model, x):
    """Forward FLOPs in G (a multiply-add counts 2), from torch's own flop counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def time_interleaved(models, x, device, runs, warmup, amp_dtype=None):
    """{name: [seconds per call]}: one call of each model per round, rounds repeated."""
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                              enabled=amp_dtype is not None)
    times = {name: [] for name in models}
    with torch.inference_mode(), autocast:
        for name, model in models.items():
            for _ in range(warmup):
                logits_of(model(x))
        for _ in range(runs):
            for name, model in models.items():
                synchronize(device)
                start = time.perf_counter()
                logits_of(model(x))
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def markdown(rows, reference):
    lines = [f"| model | params | GFLOPs | median ms | p90 ms | speed-up vs {reference} |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['gflops']:.2f} | "
                     f"{r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def main(args):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: {device} ({device_name(device)}), input 1x3x{args.size}x{args.size}")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(1, 3, args.size, args.size, device=device).to(memory_format=memory_format)
    models = {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = build_model(name, pretrained=False).eval().to(device, memory_format=memory_format)
    flops = {name: gflops(model, x) for name, model in models.items()}
    amp_dtype = (torch.bfloat16 if device.type == "cpu" else torch.float16) if args.amp else None
    times = time_interleaved(models, x, device, args.runs, args.warmup, amp_dtype)
    reference = args.models[0]
    ref_median = statistics.median(times[reference])
    rows = []
    for name, model in models.items():
        median = statistics.median(times[name])
        rows.append({"model": name, "params": count_params(model), "gflops": flops[name],
                     "median_ms": 1000 * median, "p90_ms": 1000 * percentile(times[name], 0.9),
                     "speedup": ref_median / median, "times_ms": [1000 * t for t in times[name]]})
    table = markdown(rows, reference)
    print(table)
    result = {"device": str(device), "hardware": device_name(device), "size": args.size,
              "batch": 1, "runs": args.runs, "threads": torch.get_num_threads(),
              "channels_last": args.channels_last, "amp": args.amp, "reference": reference,
              "rows": rows, "table_markdown": table}
    if args.json:
        save_json(result, args.json)
        print(f"results written to {args.json}")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
