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


# --------------------------------------------------------------------------- int8 (PT2E)

def dynamic_hw(x):
    """torch.export dynamic-shape spec: any image height and width (VOC sizes vary)."""
    h, w = torch.export.Dim("height", min=32, max=4096), torch.export.Dim("width", min=32, max=4096)
    return {"x": {2: h, 3: w}}


def quantize_int8(model, calib_images):
    """PT2E static int8: export, insert observers, calibrate, convert (torchao's flow).

    torch.ao.quantization's FX mode is deprecated in torch 2.x and cannot trace the student
    (ASPP expands by the traced input shape); PT2E captures it with torch.export. The PT2E
    entry points moved from torch.ao to torchao, hence the import from there.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import (convert_pt2e,
                                                         prepare_pt2e)

    example = calib_images[0]
    exported = torch.export.export(model.eval(), (example,), dynamic_shapes=dynamic_hw(example))
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for image in calib_images:  # observers record activation ranges
            prepared(image)
    return drop_unused_tensors(convert_pt2e(prepared))


class Frozen(nn.Module):
    """Wraps an exported/compiled callable so engine.evaluate can call .eval() on it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def train(self, mode=True):
        return self  # exported programs refuse train()/eval(); they are already in eval form

    def forward(self, x):
        return logits_of(self.fn(x))


def drop_unused_tensors(gm):
    """Delete the parameters and buffers the converted graph no longer reads.

    convert_pt2e leaves the float weights it replaced by int8 constants attached to the
    module; saved as they are, the int8 file would hold both.
    """
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            parent, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(parent) if parent else gm, leaf)
    return gm


@torch.library.custom_op("segkd::global_avg_pool", mutates_args=())
def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """adaptive_avg_pool2d(x, 1) as an op inductor calls and does not generate code for."""
    return x.mean((2, 3), keepdim=True).contiguous()


@global_avg_pool.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1], 1, 1)


def opaque_pools(gm):
    """Replace the graph's global average pools (MobileNetV3's squeeze-excite, ASPP's image
    pool) by ``global_avg_pool``, in place.

    Inductor writes such a pool as a float sum over H*W and picks its accumulation by
    whether H*W > 4096 (cpp.py, need_use_acc_helper): a guard on the input size, so every
    image on the other side of one of those thresholds (at strides 4 and 16) compiled the
    whole network again. As an opaque op the pool is aten's kernel and guards nothing.
    """
    for node in gm.graph.nodes:
        if node.target == torch.ops.aten.adaptive_avg_pool2d.default and \
                list(node.args[1]) == [1, 1]:
            node.target, node.args = torch.ops.segkd.global_avg_pool.default, node.args[:1]
    gm.graph.lint()
    gm.recompile()
    return gm


def compile_frozen(model):
    """torch.compile with inductor's freezing: constant weights are folded and prepacked,
    which is what selects the int8 (and oneDNN fp32) convolution kernels on x86.

    Compiled once for every image size (tests/test_compress.py counts the compilations):
    the global pools made opaque (``opaque_pools``, for exported graphs), and no duck
    sizing, by which dynamo gives height and width one symbol when the first image is
    square, and compiles again at the first that is not. Inference only: the inputs are
    made inference tensors (a copy of 3*H*W floats where they are not).
    """
    import torch._inductor.config as inductor_config
    from torch.fx.experimental import _config as shape_config
    inductor_config.freezing = True
    inductor_config.cpp_wrapper = True  # the graph's calls made from C++, not Python: ~15% less
    if isinstance(model, torch.fx.GraphModule):
        opaque_pools(model)
    compiled = torch.compile(model, dynamic=True)  # val images come in many sizes

    def run(x):
        # duck sizing is read when a compilation starts; and dynamo guards on whether x is an
        # inference tensor (made under inference mode, as evaluate's are) or not (the sweep's)
        with shape_config.patch(use_duck_shape=False), torch.inference_mode():
            return compiled(x if x.is_inference() else x.clone())
    return run


def load_int8(path):
    """The int8 program ``save_int8`` wrote, as a module, in any process. Its quantize and
    dequantize ops are torchao's: importing torchao registers them, and torch.export.load
    cannot resolve the graph without them."""
    importlib.import_module("torchao.quantization.pt2e")  # registers quantized_decomposed ops
    return torch.export.load(str(path)).module()


def save_int8(qmodel, example, path):
    """The int8 program as torch.export writes it (int8 weights), for its size on disk."""
    program = torch.export.export(qmodel, (example,), dynamic_shapes=dynamic_hw(example))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))


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
    torch_save(model_record(model, epoch=ckpt.get("epoch"), args=ckpt.get("args"),
                            pruning=info), path)


# --------------------------------------------------------------------------- ONNX

def export_onnx(model, example, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model.eval(), (example,), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_shapes=dynamic_hw(example),
                      external_data=False, dynamo=True)


class OnnxModel(nn.Module):
    """An onnxruntime session behind the nn.Module interface engine.evaluate expects."""

    def __init__(self, path, threads):
        super().__init__()
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # onnxruntime's idle threads spin-wait by default; in an interleaved timing loop they
        # steal the cores from whichever model runs next (measured: fp32 PyTorch 2x slower)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x):
        out = self.session.run(None, {"image": x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


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


def int8_variant(model, args, x, out_dir, stem):
    """PT2E int8, calibrated on training images, saved, and compiled unless --int8-eager."""
    calib = build_dataset(args.data_root, "train", limit=args.calib_images,
                          download=not args.no_download, transforms=eval_transforms())
    images = [to_model_input(calib[i][0][None]) for i in range(len(calib))]
    qmodel = quantize_int8(model, images)
    path = out_dir / f"{stem}_int8.pt2"
    save_int8(qmodel, images[0], path)
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


def onnx_variant(model, x, out_dir, stem):
    path = out_dir / f"{stem}.onnx"
    export_onnx(model, x, path)
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
        variants["int8"] = int8_variant(model, args, x, out_dir, stem)
    if args.compile_fp32:
        runner = compile_frozen(copy.deepcopy(model))
        with torch.inference_mode():
            runner(x)
        variants["fp32_compiled"] = {"model": Frozen(runner), "path": fp32_path,
                                     "note": "fp32, inductor, freezing"}
    if "prune" not in args.skip:
        variants.update(pruned_variants(model, ckpt, args, out_dir, stem))
    if "onnx" not in args.skip:
        variants["onnx"] = onnx_variant(model, x, out_dir, stem)
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
