"""Time the int8 runtime candidates of the lite student side by side, in one process, on this
CPU (issue 23, item 1): which int8 path is fastest at batch 1, and is it >= 2.0x fp32
PyTorch and >= 1.25x onnxruntime fp32?

Candidates (random weights: speed does not depend on them; no mIoU here):

- fp32: eager PyTorch (the reference of the 2.0x goal);
- ort_fp32: onnxruntime on runtimes.export_onnx's file (runtimes.OnnxModel; the reference of
  the 1.25x goal);
- pt2e_int8: runtimes.quantize_int8 + runtimes.compile_frozen, as compress.py runs it;
- ov_fp32: OpenVINO, openvino.convert_model of the same ONNX file, compiled for "CPU";
- ov_int8 / ov_int8_mixed: that model quantised by NNCF post-training quantisation
  (nncf.quantize), default preset (symmetric) and QuantizationPreset.MIXED; the JSON lists
  the layers of the compiled model's runtime graph by type and precision, and whether
  hard-swish ran as a layer of its own or fused into a convolution;
- ort_int8 / ort_int8_float_hswish: onnxruntime static int8 (quantize_static, QDQ,
  per-channel weights), plain and with the HardSwish/HardSigmoid nodes left in float.

All models keep dynamic height and width: one model of each runs every --size, converted
once. The calibration set is --calib-images random images of sizes between 260 and 520 px.

Timing: compute.time_interleaved, one call of each model per round, --runs rounds, every
runtime on --threads threads. As in compress.time_variants, inductor's compiled kernels are
kept apart from the other runtimes' thread pools: three groups, each with fp32 again (the
PyTorch one, onnxruntime's, OpenVINO's with onnxruntime fp32 again); every speed-up is a
ratio of medians from the same rounds, pt2e_int8's against ort_fp32 chained through fp32.
A candidate whose package is missing is skipped, with a note in the JSON.

    nice -n 5 python int8_runtimes.py --runs 20 --json report/int8/int8_runtimes.json
"""
import argparse
import importlib
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill import logits_of
from cli import HelpFormatter, UserError, git_revision, markdown_table, run_cli
from compute import device_name, percentile, set_compute_resources, time_interleaved, timed
from files import save_json
from nets import build_model

GOAL_VS_FP32, GOAL_VS_ORT = 2.0, 1.25
GROUPS = {"pytorch": ["fp32", "pt2e_int8"],
          "onnxruntime": ["fp32", "ort_fp32", "ort_int8", "ort_int8_float_hswish"],
          "openvino": ["fp32", "ort_fp32", "ov_fp32", "ov_int8", "ov_int8_mixed"]}
PACKAGES = {"pt2e_int8": ("torchao",), "ort_fp32": ("onnx", "onnxscript", "onnxruntime"),
            "ort_int8": ("onnxruntime",), "ort_int8_float_hswish": ("onnxruntime",),
            "ov_fp32": ("openvino",), "ov_int8": ("openvino", "nncf"),
            "ov_int8_mixed": ("openvino", "nncf")}


def hw_size(text):
    """'HxW' (or one number, a square side) as (height, width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 32:
        raise argparse.ArgumentTypeError(f"{text!r}: give HxW (e.g. 375x500) or one side, >= 32")
    return (parts[0], parts[-1])


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--arch", default="lite", help="student to build (random weights)")
    parser.add_argument("--size", type=hw_size, nargs="+", default=[(520, 520), (375, 500)],
                        help="input sizes HxW, batch 1, all run by the same models "
                             "(default: 520x520 375x500)")
    parser.add_argument("--runs", type=int, default=20, help="timed rounds per group")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model first")
    parser.add_argument("--calib-images", type=int, default=16,
                        help="random calibration images for every int8 candidate")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of every runtime (PyTorch, onnxruntime, OpenVINO)")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(PACKAGES),
                        help="candidates to leave out")
    parser.add_argument("--work-dir", default=None,
                        help="where the ONNX files go (default: a temporary directory)")
    parser.add_argument("--json", default="outputs/int8_runtimes.json", help="results JSON")
    return parser


# --------------------------------------------------------------------------- helpers

class NumpyRunner(nn.Module):
    """A runtime's callable (numpy in, numpy out) behind the nn.Module interface."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return torch.from_numpy(np.asarray(self.fn(x.detach().cpu().numpy())))


def calibration_images(n, seed=0):
    """``n`` random normalised-looking images of sizes from 260 to 520 px, reproducibly."""
    rng = torch.Generator().manual_seed(seed)
    sides = torch.randint(260, 521, (n, 2), generator=rng)
    return [torch.randn(1, 3, int(h), int(w), generator=rng) for h, w in sides]


def missing_packages(name):
    missing = []
    for module in PACKAGES.get(name, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def versions():
    """Versions of the packages the candidates use (None: not installed)."""
    out = {}
    for module in ("torch", "torchao", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf"):
        try:
            out[module] = importlib.import_module(module).__version__
        except ImportError:
            out[module] = None
    return out


def cpu_facts():
    """The CPU's model name and the flags that decide int8 kernels (from /proc/cpuinfo)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the name only
        lines = []
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    name = device_name(torch.device("cpu"))
    keys = ("avx2", "fma", "avx512", "vnni", "amx", "avx_vnni")
    return {"name": name, "int8_flags": sorted({f for f in flags if any(k in f for k in keys)}),
            "has_avx512": any(f.startswith("avx512") for f in flags),
            "has_vnni": any("vnni" in f for f in flags),
            "has_amx": any(f.startswith("amx") for f in flags)}


# --------------------------------------------------------------------------- candidates

def pt2e_candidate(model, calib):
    from runtimes import Frozen, compile_frozen, quantize_int8
    return Frozen(compile_frozen(quantize_int8(model, calib))), \
        "PT2E static int8 (torchao X86InductorQuantizer), inductor with freezing"


def ort_int8_file(onnx_path, calib, float_hswish):
    """quantize_static (QDQ, per-channel weights, MinMax) of ``onnx_path``; with
    ``float_hswish`` the HardSwish/HardSigmoid nodes are excluded (they stay in float)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": x.numpy()} for x in calib])

        def get_next(self):
            return next(self.items, None)

    graph = onnx.load(str(onnx_path)).graph
    excluded = [n.name for n in graph.node if n.op_type in ("HardSwish", "HardSigmoid")] \
        if float_hswish else []
    out = onnx_path.with_name(onnx_path.stem + ("_int8_fhs" if float_hswish else "_int8") + ".onnx")
    quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    return out, len(excluded)


def ort_runtime_ops(path, threads):
    """Op-type counts of the graph onnxruntime runs for ``path`` after its own optimisations
    (QDQ pairs fused into QLinearConv, activations fused into Conv, NCHWc layout): which ops
    run in int8 (QLinear*) and which hard-swish parts are left in float."""
    import collections

    import onnx
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the warning that the saved graph is for this CPU only
    optimized = path.with_name(path.stem + "_ort_optimized.onnx")
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return dict(counts.most_common())


def ov_compile(ov_model, threads):
    import openvino as ov
    # f32 pinned: on a CPU with AVX512_BF16 or AMX the plugin's default runs float layers in
    # bf16, which made "ov_fp32" a bf16 model (67 bf16 convolutions on an AVX-512 EPYC)
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                         "NUM_STREAMS": 1,
                                                         "PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()
    return compiled, NumpyRunner(run)


def ov_int8_model(ov_model, calib, preset):
    import nncf
    kwargs = {} if preset is None else {"preset": preset}
    return nncf.quantize(ov_model, nncf.Dataset([x.numpy() for x in calib]),
                         subset_size=len(calib), **kwargs)


def runtime_layers(compiled, source):
    """The compiled model's executed layers: counts by (layer type, runtime precision), the
    kernels of its convolutions, and where each hard-swish / hard-sigmoid of ``source`` (the
    ov.Model compiled) went: a layer of its own, or fused into a layer of another type (a
    runtime layer's originalLayersNames lists the source ops it runs)."""
    activations = {op.get_friendly_name(): op.get_type_name() for op in source.get_ordered_ops()
                   if op.get_type_name() in ("HSwish", "HSigmoid", "HardSigmoid")}
    counts, placed, kernels = {}, {}, {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        key = f"{info['layerType'].astype(str)} {info['runtimePrecision'].astype(str)}"
        counts[key] = counts.get(key, 0) + 1
        if key.startswith("Convolution"):  # the oneDNN kernel behind each convolution
            kernel = f"{key} {info['primitiveType'].astype(str)}"
            kernels[kernel] = kernels.get(kernel, 0) + 1
        names = [n for n in info["originalLayersNames"].astype(str).split(",") if n]
        for name in names:
            if name in activations:
                where = "own layer" if len(names) == 1 else "fused into"
                slot = f"{activations[name]} {where} {key}"
                placed[slot] = placed.get(slot, 0) + 1
    return {"layers_by_type_and_precision": dict(sorted(counts.items())),
            "convolution_kernels": dict(sorted(kernels.items())),
            "activations": dict(sorted(placed.items())),
            "activations_in_source": len(activations)}


def ov_candidate(name, ctx):
    """OpenVINO fp32, or NNCF int8 (default or MIXED preset), of the ONNX file; returns
    (runner, note, compiled model, the ov.Model compiled)."""
    import openvino as ov
    source, note = ov.convert_model(str(ctx["onnx"])), "openvino.convert_model(ONNX), fp32"
    if name != "ov_fp32":
        import nncf
        mixed = name == "ov_int8_mixed"
        source = ov_int8_model(source, ctx["calib"], nncf.QuantizationPreset.MIXED if mixed
                               else None)
        note = (f"NNCF post-training int8 ({'MIXED' if mixed else 'default (PERFORMANCE)'} "
                f"preset, {len(ctx['calib'])} random images)")
    compiled, runner = ov_compile(source, ctx["threads"])
    return runner, note + f", CPU plugin, INFERENCE_NUM_THREADS={ctx['threads']}", compiled, source


def build_candidate(name, model, ctx):
    """{'model', 'note', ...} of one candidate (ctx: the ONNX file, calibration images,
    threads)."""
    from runtimes import OnnxModel
    if name == "fp32":
        return {"model": model, "note": "eager PyTorch, fp32"}
    if name == "pt2e_int8":
        runner, note = pt2e_candidate(model, ctx["calib"])
        return {"model": runner, "note": note}
    if name == "ort_fp32":
        return {"model": OnnxModel(ctx["onnx"], ctx["threads"]),
                "runtime_ops": ort_runtime_ops(ctx["onnx"], ctx["threads"]),
                "note": "onnxruntime CPUExecutionProvider, fp32 (runtimes.OnnxModel)"}
    if name.startswith("ort_int8"):
        path, excluded = ort_int8_file(ctx["onnx"], ctx["calib"], name.endswith("hswish"))
        return {"model": OnnxModel(path, ctx["threads"]), "excluded_nodes": excluded,
                "runtime_ops": ort_runtime_ops(path, ctx["threads"]),
                "note": "onnxruntime quantize_static (QDQ, per-channel, u8 activations, s8 "
                        "weights, MinMax)" + (f", {excluded} HardSwish/HardSigmoid nodes "
                                              "excluded (float)" if excluded else "")}
    runner, note, compiled, source = ov_candidate(name, ctx)
    return {"model": runner, "note": note, "ov": (compiled, source)}


def build_candidates(model, args, work_dir):
    """{name: candidate} for every candidate not skipped, and {name: why} for those left out
    (a package missing, --skip, or an error while building)."""
    names = ["fp32"] + [n for g in GROUPS.values() for n in g if n != "fp32"]
    names = list(dict.fromkeys(names))
    ctx = {"calib": calibration_images(args.calib_images), "threads": args.threads,
           "onnx": work_dir / f"{args.arch}.onnx"}
    built, skipped = {}, {}
    for name in names:
        missing = missing_packages(name) + (missing_packages("ort_fp32")
                                            if name.startswith(("ort", "ov")) else [])
        if name in args.skip or missing:
            skipped[name] = "--skip" if name in args.skip else \
                f"not installed: {', '.join(dict.fromkeys(missing))}"
            continue
        if name.startswith(("ort", "ov")) and not ctx["onnx"].exists():
            from runtimes import export_onnx
            export_onnx(model, ctx["calib"][0], ctx["onnx"])
        print(f"building {name}")
        try:
            built[name] = build_candidate(name, model, ctx)
        except Exception as exc:  # one candidate failing must not lose the others' numbers
            skipped[name] = f"failed to build: {type(exc).__name__}: {exc}"[:500]
            print(f"{name}: {skipped[name]}")
    return built, skipped


# --------------------------------------------------------------------------- measuring

def check_sizes(built, sizes):
    """Every candidate on every size, one model each, not converted again: the first call's
    seconds (a compilation per new size would show here), the output shape, and the largest
    logit difference from fp32 (int8 of random weights: only a sanity check)."""
    checks = {name: {} for name in built}
    with torch.inference_mode():
        for h, w in sizes:
            x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 7919 + w))
            reference = logits_of(built["fp32"]["model"](x))
            for name, c in built.items():
                out, seconds = timed(lambda: logits_of(c["model"](x)), torch.device("cpu"))
                checks[name][f"{h}x{w}"] = {
                    "first_call_s": seconds, "output_shape": list(out.shape),
                    "shape_ok": list(out.shape) == [1, 21, h, w],
                    "max_abs_diff_vs_fp32": float((out - reference).abs().max()),
                    "max_abs_fp32_logit": float(reference.abs().max())}
    return checks


def time_groups(built, sizes, args):
    """{size: {group: {name: [seconds]}}}: each group's candidates interleaved, per size."""
    timings = {}
    for h, w in sizes:
        x = torch.randn(1, 3, h, w)
        timings[f"{h}x{w}"] = {}
        for group, names in GROUPS.items():
            present = [n for n in names if n in built]
            if len(present) < 2:
                continue
            print(f"timing {group} group at 1x3x{h}x{w}: {', '.join(present)}")
            timings[f"{h}x{w}"][group] = time_interleaved(
                {n: built[n]["model"] for n in present}, x, torch.device("cpu"), args.runs,
                args.warmup)
    return timings


def median_ms(times):
    return 1000 * statistics.median(times)


def home_group(name, groups):
    """The group a candidate's own numbers come from: fp32's is PyTorch's, ort_fp32's
    onnxruntime's, every other candidate's the one it is timed in."""
    order = {"fp32": "pytorch", "ort_fp32": "onnxruntime"}
    if name in order and order[name] in groups:
        return order[name]
    return next(g for g, times in groups.items() if name in times)


def speed_rows(timings):
    """One row per size and candidate: median and p90 ms, and the speed-ups against fp32 and
    ort_fp32 from the same rounds (chained through fp32 where ort_fp32 was not in them)."""
    rows = []
    for size, groups in timings.items():
        ort = groups.get("onnxruntime", {})
        ort_vs_fp32 = median_ms(ort["fp32"]) / median_ms(ort["ort_fp32"]) if ort else None
        names = dict.fromkeys(n for times in groups.values() for n in times)
        for name in names:
            group = home_group(name, groups)
            times, fp32 = groups[group][name], groups[group]["fp32"]
            vs_fp32 = median_ms(fp32) / median_ms(times)
            if "ort_fp32" in groups[group]:
                vs_ort, how = median_ms(groups[group]["ort_fp32"]) / median_ms(times), "same rounds"
            else:
                vs_ort = vs_fp32 / ort_vs_fp32 if ort_vs_fp32 else None
                how = "chained through fp32" if ort_vs_fp32 else None
            rows.append({"size": size, "candidate": name, "group": group,
                         "median_ms": median_ms(times), "p90_ms": 1000 * percentile(times, 0.9),
                         "fp32_median_ms_same_rounds": median_ms(fp32),
                         "speedup_vs_fp32": vs_fp32, "speedup_vs_ort_fp32": vs_ort,
                         "vs_ort_fp32_how": how,
                         "meets_goal": bool(vs_ort and vs_fp32 >= GOAL_VS_FP32 and
                                            vs_ort >= GOAL_VS_ORT),
                         "times_ms": [1000 * t for t in times]})
    return rows


def markdown(rows):
    header = ["size", "candidate", "median ms", "p90 ms", "vs fp32 PyTorch", "vs ORT fp32",
              f"meets {GOAL_VS_FP32:g}x / {GOAL_VS_ORT:g}x"]
    return markdown_table(header, [
        [r["size"], r["candidate"], f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}",
         f"{r['speedup_vs_fp32']:.2f}x",
         "-" if r["speedup_vs_ort_fp32"] is None else f"{r['speedup_vs_ort_fp32']:.2f}x"
         + ("*" if r["vs_ort_fp32_how"] == "chained through fp32" else ""),
         "yes" if r["meets_goal"] else "no"] for r in rows])


def describe(built, skipped):
    """What the JSON says of each candidate: its note, OpenVINO's runtime layers, or why it
    was skipped."""
    out = {name: {"note": c["note"], **{k: c[k] for k in ("excluded_nodes", "runtime_ops")
                                        if k in c}}
           for name, c in built.items()}
    for name, c in built.items():
        if "ov" in c:
            out[name]["runtime_layers"] = runtime_layers(*c["ov"])
    out.update({name: {"skipped": why} for name, why in skipped.items()})
    return out


def main(args):
    print(f"args: {vars(args)}")
    print(set_compute_resources(args, torch.device("cpu")))
    if args.runs < 1 or args.calib_images < 1:
        raise UserError("--runs and --calib-images: give at least 1")
    model = build_model(args.arch, 21, pretrained=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(args.work_dir or tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        built, skipped = build_candidates(model, args, work_dir)
        checks = check_sizes(built, args.size)
        timings = time_groups(built, args.size, args)
        candidates = describe(built, skipped)
    rows = speed_rows(timings)
    table = markdown(rows)
    print(table)
    result = {"arch": args.arch, "weights": "random (speed only; no mIoU)", "cpu": cpu_facts(),
              "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
              "sizes": [f"{h}x{w}" for h, w in args.size], "batch": 1,
              "calib_images": args.calib_images, "versions": versions(), "git": git_revision(),
              "groups": GROUPS, "goal": {"vs_fp32": GOAL_VS_FP32, "vs_ort_fp32": GOAL_VS_ORT},
              "candidates": candidates, "size_checks": checks, "rows": rows,
              "table_markdown": table}
    save_json(result, args.json)
    print(f"results written to {args.json}")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
