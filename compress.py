"""Compress a trained student for CPU deployment: int8, pruning, ONNX; score and time each.

From one checkpoint written by train_kd.py (rebuilt with nets.model_from_checkpoint):

- int8: post-training static quantisation with PyTorch's PT2E flow (torch.export, then
  torchao's prepare_pt2e / convert_pt2e with the X86InductorQuantizer), calibrated on
  --calib-images training images at full size, then compiled by inductor with freezing on
  (its constant weights folded into prepacked int8 convolutions; without freezing, and
  without compiling, the quantize/dequantize pattern runs in float and is slower than fp32);
  compiling takes a minute or two on a CPU. --int8-eager keeps that float reference instead;
- pruning: unstructured (l1_unstructured on every conv weight, made permanent: zeroed
  weights, same shape and speed) and structural channel pruning (pruning.py: Torch-Pruning
  removes --sparsity of the channels of every coupled group, the classifier's 21 outputs
  kept), which gives a narrower network, saved as a state dict plus its layer widths in
  model_args; it is fine-tuned with train_kd.py --init-from, the unpruned student teaching;
- ONNX: torch.onnx.export (dynamic height and width), checked against PyTorch's logits and
  timed in onnxruntime.

Each result gets its size on disk, its CPU latency at 1x3xSIZExSIZE (timed interleaved with
the fp32 model, warm-up first, as benchmark.py), and its val mIoU and change against fp32 from
engine.evaluate over data.eval_loader. The PyTorch variants are timed together first, then
the ONNX model with fp32 again: inductor's compiled kernels and onnxruntime's thread pool,
interleaved in one process, fight for the cores and slow each other down many times over.
Everything lands in --json (outputs/compress.json).

    python compress.py --model_path models/no_kd_last.pth --data-root ./data --limit 100
    python compress.py --model_path models/no_kd_last.pth --data-root ./data --sparsity 0.3 --compile-fp32
"""
import argparse
import copy
import importlib
import os
import statistics
import zlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from checkpoints import model_record
from cli import HelpFormatter, UserError, git_revision, markdown_table, run_cli
from compute import (add_compute_flags, count_params, device_name, percentile,
                     set_compute_resources, time_interleaved, timed)
from data import build_dataset, eval_loader, eval_transforms, to_model_input
from distill import logits_of
from engine import evaluate
from files import save_json, torch_save
from nets import model_from_checkpoint
from pruning import prune_channels, removed_channel_fraction
from runtimes import (Frozen, OnnxModel, compile_frozen, export_metadata, export_onnx,
                      quantize_int8, save_int8)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    # input and data
    parser.add_argument("--model_path", "--model-path", required=True, dest="model_path",
                        help="a student checkpoint written by train_kd.py (models/NAME_last.pth)")
    parser.add_argument("--data-root", default="./data", help="directory holding VOCdevkit/VOC2012")
    parser.add_argument("--no-download", action="store_true", help="never download VOC")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N val images")
    parser.add_argument("--calib-images", type=int, default=16,
                        help="training images (full size, no augmentation) for int8 calibration")
    # what to produce
    parser.add_argument("--sparsity", type=float, default=0.5,
                        help="fraction of conv weights set to zero (unstructured) / of the "
                             "channels of every coupled group removed (channel pruning)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("int8", "prune", "onnx"),
                        help="steps to leave out")
    parser.add_argument("--int8-eager", action="store_true",
                        help="do not compile the int8 model: run its quantize/dequantize graph "
                             "eagerly (a float reference: same numbers, no int8 kernels, slow)")
    parser.add_argument("--compile-fp32", action="store_true",
                        help="also time fp32 compiled by inductor (freezing on), as a row "
                             "'fp32_compiled'")
    # timing
    parser.add_argument("--size", type=int, default=520, help="square input side of the latency runs")
    parser.add_argument("--runs", type=int, default=10, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    parser.add_argument("--size-sweep", type=int, default=0, metavar="N",
                        help="also time fp32 and int8 on N random images of N distinct sizes "
                             "(sides from --size/2 to --size), each image once per model in "
                             "turn: the cost of new sizes (the JSON's size_sweep); 0: off")
    add_compute_flags(parser, device=None, workers=False)  # int8 and ONNX here run on a CPU
    # output
    parser.add_argument("--out-dir", default="models/compressed",
                        help="where the int8 program, pruned checkpoints and ONNX files go")
    parser.add_argument("--json", default="outputs/compress.json", help="results JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    return parser


# --------------------------------------------------------------------------- pruning

def prunable_convs(model):
    """Conv layers of unstructured pruning: all of them."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def prune_model(model, sparsity, structured):
    """A pruned copy; returns (model, fraction): unstructured, the conv weights zeroed (masks
    made permanent) and their zero fraction; structured, channels removed (pruning.py) and
    the fraction of conv output channels gone."""
    if structured:
        pruned = prune_channels(model, sparsity)
        return pruned, removed_channel_fraction(model, pruned)
    pruned = copy.deepcopy(model)
    for _, conv in prunable_convs(pruned):
        prune.l1_unstructured(conv, "weight", amount=sparsity)
        prune.remove(conv, "weight")  # weight = weight_orig * mask, the mask dropped
    convs = prunable_convs(pruned)
    zeros = sum(int((m.weight == 0).sum()) for _, m in convs)
    return pruned, zeros / sum(m.weight.numel() for _, m in convs)


def save_pruned(model, ckpt, path, info):
    """A checkpoint in the repo's schema, loadable by evaluate.py."""
    names = {"class_names": ckpt["class_names"]} if "class_names" in ckpt else {}  # its own
    torch_save(model_record(model, epoch=ckpt.get("epoch"), args=ckpt.get("args"),
                            pruning=info, **names), path)


# --------------------------------------------------------------------------- main

OPTIONAL = {"int8": ("torchao",), "prune": ("torch_pruning",),
            "onnx": ("onnx", "onnxscript", "onnxruntime")}


def check_optional_imports(skip):
    """Refuse to start when a step's optional package is missing (requirements-optional.txt)."""
    missing = {}
    for step, modules in OPTIONAL.items():
        for module in modules:
            if step in skip:
                continue
            try:
                importlib.import_module(module)
            except ImportError:
                missing.setdefault(step, []).append(module)
    if missing:
        names = ", ".join(m for ms in missing.values() for m in ms)
        steps = f"{' and '.join(missing)} step{'s' if len(missing) > 1 else ''}"
        raise UserError(f"{names} not installed (needed by the {steps}); "
                        "install them with `pip install -r requirements-optional.txt`, or leave "
                        f"the step out with --skip {' '.join(missing)}")


def file_bytes(path):
    return os.path.getsize(path)


def zipped_bytes(path):
    """Size after zlib: zeroed weights cost nothing here, so pruning shows in it."""
    return len(zlib.compress(Path(path).read_bytes(), 6))


def int8_variant(model, ckpt, args, x, out_dir, stem):
    """PT2E int8, calibrated on training images, saved, and compiled unless --int8-eager."""
    calib = build_dataset(args.data_root, "train", limit=args.calib_images,
                          download=not args.no_download, transforms=eval_transforms())
    images = [to_model_input(calib[i][0][None]) for i in range(len(calib))]
    qmodel = quantize_int8(model, images)
    path = out_dir / f"{stem}_int8.pt2"
    save_int8(qmodel, images[0], path, export_metadata(model, ckpt, args.model_path))
    how = "eager Q/DQ reference" if args.int8_eager else "inductor, freezing"
    print(f"int8: {how}" + ("" if args.int8_eager else " (compiling: a minute or two)"))
    runner = qmodel if args.int8_eager else compile_frozen(qmodel)
    with torch.inference_mode():  # compile now, not inside the first timed call
        compile_s = timed(lambda: runner(x), torch.device("cpu"))[1]
    return {"model": Frozen(runner), "path": path, "first_call_s": compile_s,
            "note": f"PT2E static int8 (torchao X86InductorQuantizer), {len(images)} "
                    f"calibration images, {how}"}


def pruned_variants(model, ckpt, args, out_dir, stem):
    """Unstructured and channel pruning at --sparsity, each saved as a repo checkpoint (the
    channel-pruned one with its widths in model_args, so it rebuilds alone)."""
    variants = {}
    for kind, structured in (("pruned_unstructured", False), ("pruned_channels", True)):
        pruned, fraction = prune_model(model, args.sparsity, structured)
        path = out_dir / f"{stem}_{kind}_{args.sparsity:g}.pth"
        params = (count_params(model), count_params(pruned))
        info = {"method": "Torch-Pruning MagnitudePruner (L2, coupled channel groups), channels "
                          "removed" if structured else "l1_unstructured",
                "sparsity": args.sparsity, "params_before": params[0], "params_after": params[1],
                "removed_channel_fraction" if structured else "zero_fraction": fraction}
        save_pruned(pruned, ckpt, path, info)
        variants[kind] = {"model": pruned.eval(), "path": path,
                          "note": f"{info['method']} at {args.sparsity:g}, {params[1]:,} of "
                                  f"{params[0]:,} parameters, no fine-tuning"}
        if not structured:
            variants[kind]["zero_fraction"] = fraction
    return variants


def onnx_variant(model, ckpt, args, x, out_dir, stem):
    path = out_dir / f"{stem}.onnx"
    export_onnx(model, x, path, export_metadata(model, ckpt, args.model_path))
    onnx_model = OnnxModel(path, torch.get_num_threads())
    with torch.inference_mode():  # one odd-sized input as well: the shapes are dynamic
        checks = [x, torch.randn(1, 3, 333, 500)]
        diff = max(float((onnx_model(c) - logits_of(model(c))).abs().max()) for c in checks)
    print(f"ONNX vs PyTorch: max abs difference of the logits {diff:.2e}")
    return {"model": onnx_model, "path": path, "max_abs_diff": diff,
            "note": "onnxruntime CPUExecutionProvider, fp32"}


def build_variants(model, ckpt, args, x, out_dir, stem):
    """fp32 and every requested variant: {name: {'model', 'path', 'note', ...}}."""
    fp32_path = out_dir / f"{stem}_fp32.pth"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), fp32_path)
    variants = {"fp32": {"model": model, "path": fp32_path, "note": "the checkpoint's weights"}}
    if "int8" not in args.skip:
        variants["int8"] = int8_variant(model, ckpt, args, x, out_dir, stem)
    if args.compile_fp32:
        runner = compile_frozen(copy.deepcopy(model))
        with torch.inference_mode():
            runner(x)
        variants["fp32_compiled"] = {"model": Frozen(runner), "path": fp32_path,
                                     "note": "fp32, inductor, freezing"}
    if "prune" not in args.skip:
        variants.update(pruned_variants(model, ckpt, args, out_dir, stem))
    if "onnx" not in args.skip:
        variants["onnx"] = onnx_variant(model, ckpt, args, x, out_dir, stem)
    return variants


def time_variants(variants, x, device, args):
    """{name: (its times, fp32's times in the same rounds)}: the PyTorch variants together,
    then ONNX with fp32 again (module docstring: why apart)."""
    groups = [[name for name in variants if name != "onnx"]]
    if "onnx" in variants:
        groups.append(["fp32", "onnx"])
    rounds = {}
    for group in groups:
        print(f"timing {', '.join(group)} at 1x3x{args.size}x{args.size} ({device_name(device)})")
        got = time_interleaved({name: variants[name]["model"] for name in group}, x, device,
                               args.runs, args.warmup)
        for name in group:
            rounds.setdefault(name, (got[name], got["fp32"]))
    return rounds


def sweep_sizes(n, size, seed=0):
    """``n`` distinct (height, width) pairs, sides from size // 2 to size, drawn reproducibly."""
    rng = torch.Generator().manual_seed(seed)
    low, sizes = size // 2, []
    if (size - low + 1) ** 2 < n:
        raise UserError(f"--size-sweep {n}: only {(size - low + 1) ** 2} distinct sizes between "
                        f"{low} and {size} px; raise --size or lower --size-sweep")
    while len(sizes) < n:
        hw = tuple(int(v) for v in torch.randint(low, size + 1, (2,), generator=rng))
        if hw not in sizes:
            sizes.append(hw)
    return sizes


def size_sweep(variants, args, device):
    """fp32 and int8 on --size-sweep images of distinct sizes, one call each, in turn (any
    compilation a new size triggers is in its time): per-image times and the cost ratio."""
    names = [name for name in ("fp32", "int8") if name in variants]
    sizes = sweep_sizes(args.size_sweep, args.size)
    times = {name: [] for name in names}
    print(f"size sweep: {len(sizes)} sizes, {', '.join(names)} ({device_name(device)})")
    with torch.inference_mode():
        for h, w in sizes:
            x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 10007 + w))
            for name in names:
                times[name].append(timed(lambda: variants[name]["model"](x), device)[1])
    result = {"sizes": [list(hw) for hw in sizes],
              "seconds": {name: t for name, t in times.items()},
              "total_s": {name: sum(t) for name, t in times.items()},
              "median_ms": {name: 1000 * statistics.median(t) for name, t in times.items()},
              "max_ms": {name: 1000 * max(t) for name, t in times.items()}}
    if "int8" in names:
        result["int8_over_fp32_total"] = result["total_s"]["int8"] / result["total_s"]["fp32"]
        print(f"size sweep: int8 costs {result['int8_over_fp32_total']:.2f}x fp32 over "
              f"{len(sizes)} sizes (median {result['median_ms']['int8']:.1f} vs "
              f"{result['median_ms']['fp32']:.1f} ms, slowest {result['max_ms']['int8']:.0f} ms)")
    return result


def score_variants(variants, rounds, loader, device, progress):
    """One row per variant: size, latency, mIoU, and each against fp32."""
    rows = []
    for name, v in variants.items():
        scores = evaluate(v["model"], loader, device, desc=name, progress=progress)
        times, fp32_times = rounds[name]
        row = {"variant": name, "note": v["note"], "file": str(v["path"]),
               "fp32_median_ms_same_round": 1000 * statistics.median(fp32_times),
               "size_bytes": file_bytes(v["path"]), "zlib_bytes": zipped_bytes(v["path"]),
               "median_ms": 1000 * statistics.median(times),
               "p90_ms": 1000 * percentile(times, 0.9), "miou": scores["miou"],
               "pixel_accuracy": scores["pixel_accuracy"], "times_ms": [1000 * t for t in times],
               **{k: v[k] for k in ("zero_fraction", "max_abs_diff", "first_call_s") if k in v}}
        rows.append(row)
    for row in rows:  # against fp32 timed in the same interleaved rounds
        row["speedup_vs_fp32"] = row["fp32_median_ms_same_round"] / row["median_ms"]
        row["miou_change_points"] = 100 * (row["miou"] - rows[0]["miou"])
        row["size_ratio"] = row["size_bytes"] / rows[0]["size_bytes"]
    return rows


def main(args):
    print(f"args: {vars(args)}")
    device = torch.device("cpu")
    print(set_compute_resources(args, device))
    if not 0 <= args.sparsity < 1:
        raise UserError(f"--sparsity {args.sparsity}: give a fraction in [0, 1)")
    check_optional_imports(args.skip)  # before anything is written
    model, ckpt = model_from_checkpoint(args.model_path)
    model.eval()
    out_dir = Path(args.out_dir)
    loader = eval_loader(args.data_root, args.limit, 0, not args.no_download)
    x = torch.randn(1, 3, args.size, args.size)
    variants = build_variants(model, ckpt, args, x, out_dir, Path(args.model_path).stem)
    rounds = time_variants(variants, x, device, args)
    sweep = size_sweep(variants, args, device) if args.size_sweep else None
    rows = score_variants(variants, rounds, loader, device, args.progress)
    table = markdown(rows)
    print(table)
    result = {"checkpoint": str(args.model_path), "arch": ckpt["model_args"]["arch"],
              "device": "cpu", "hardware": device_name(device), "size": args.size,
              "runs": args.runs, "threads": torch.get_num_threads(),
              "int8_runtime": "eager" if args.int8_eager else "inductor (freezing)",
              "data_root": str(args.data_root), "num_val_images": len(loader.dataset),
              "sparsity": args.sparsity, "onnx_max_abs_diff": variants.get("onnx", {}).get(
                  "max_abs_diff"), "git": git_revision(),
              "quantization_api": "torch.export + torchao.quantization.pt2e (prepare_pt2e/"
                                  "convert_pt2e, X86InductorQuantizer)",
              "fine_tuning": "not run here: fine-tune a pruned checkpoint with train_kd.py "
                             "--init-from PATH (docs/compression.md)",
              "size_sweep": sweep, "rows": rows, "table_markdown": table}
    save_json(result, args.json)
    print(f"results written to {args.json}; files in {out_dir}/")
    return result


def markdown(rows):
    header = ["variant", "size MB", "median ms", "p90 ms", "speed-up vs fp32", "mIoU (%)",
              "change (points)"]
    return markdown_table(header, [
        [r["variant"], f"{r['size_bytes'] / 2 ** 20:.2f}", f"{r['median_ms']:.1f}",
         f"{r['p90_ms']:.1f}", f"{r['speedup_vs_fp32']:.2f}x", f"{100 * r['miou']:.2f}",
         f"{r['miou_change_points']:+.2f}"] for r in rows])


if __name__ == "__main__":
    run_cli(main, get_args_parser())
