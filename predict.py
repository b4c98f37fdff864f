"""Segment your own photos, folders and videos with any model the lab writes: a train_kd.py
checkpoint, a compressed form of compress.py, or a torchvision model by name (its default
weights).

    python predict.py --model_path models/combined_kd_last.pth holiday.jpg
    python predict.py --model_path fcn_resnet50 photos/ "more/*.png" --max-side 1024
    python predict.py --model_path models/no_kd_last.pth clip.mp4   # needs: pip install av

Per image, in --out: NAME_mask.png (VOC palette PNG of class indices, the image's displayed
size), NAME_overlay.png, optionally NAME_logits.npy / NAME_probs.npy, and one
predictions.json (size, milliseconds, classes found with their pixel share). A video gives
NAME_overlay.mp4 at the same size and frame rate. From Python: ``predict.segment(model,
pil_image)`` (docs/predict.md).
"""
import argparse
import contextlib
import glob
import io
import json
import struct
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from checkpoints import default_class_names, recorded_class_names
from cli import HelpFormatter, UserError, one_line, ranged, run_cli
from compute import (add_compute_flags, device_name, resolve_device, set_compute_resources,
                     timed)
from data import save_mask, to_model_input
from distill import logits_of
from engine import class_map
from files import atomic_write, save_json
from nets import TORCHVISION_ARCHS, load_model
from plots import blend
from runtimes import FORMATS, load_any, model_format, runs_on

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                  ".pgm", ".jfif"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
MIN_SIDE = 32  # smaller images are padded (edge pixels repeated), their logits cropped
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
AV_MISSING = ("reading and writing videos needs PyAV, which is not installed: pip install av "
              "(or pip install -r requirements-optional.txt)")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # what to segment, with what
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="images, folders (searched recursively for image and video files), "
                             "globs, or videos (.mp4 and the like)")
    parser.add_argument("--model_path", "--model-path", required=True, dest="model_path",
                        help="a train_kd.py checkpoint (models/NAME_last.pth), a compressed "
                             "form of compress.py, or a torchvision model by name with its "
                             f"default weights ({', '.join(TORCHVISION_ARCHS)})")
    # what it writes
    parser.add_argument("--out", default="outputs/predict",
                        help="folder for the masks, overlays and predictions.json; never inside "
                             "an input folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo images whose outputs exist (a rerun skips them otherwise)")
    parser.add_argument("--save-logits", action="store_true",
                        help="also write NAME_logits.npy (classes x H x W, float16)")
    parser.add_argument("--save-probs", action="store_true",
                        help="also write NAME_probs.npy (softmax, classes x H x W, float16)")
    parser.add_argument("--max-side", type=ranged(int, 1), default=None,
                        help="resize larger images to this longest side for the network; the "
                             "logits are upsampled bilinearly, so the mask keeps the original size")
    # how it runs
    add_compute_flags(parser, workers=False)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (for log files)")
    parser.add_argument("--benchmark", action="store_true",
                        help="instead of predicting: the model's own images/s against "
                             "predict's (loading, predicting, writing), interleaved, on INPUTs; "
                             "written to --out/benchmark.json")
    parser.add_argument("--rounds", type=ranged(int, 1), default=3,
                        help="with --benchmark: interleaved rounds of each")
    return parser


# --------------------------------------------------------------------------- the Python API

def to_rgb(image):
    """A PIL image as a viewer shows it: (H, W, 3) uint8, EXIF orientation applied.

    Transparency (RGBA, LA, palette) is composited on white; grayscale, palette and CMYK
    go through Pillow's conversion; 16-bit images are scaled (not clipped) to 8 bits.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64).clip(0, None)
        top = 65535.0 if values.max() <= 65535 else values.max()  # "I": 16-bit PNGs, or more
        gray = np.round(values * (255.0 / top)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


@torch.inference_mode()
def predict_logits(model, rgb, device="cpu", max_side=None):
    """(1, classes, H, W) logits of an (H, W, 3) uint8 image, preprocessed as evaluate.py does
    (``data.to_model_input`` of the uint8 batch). With ``max_side`` a larger image is
    resized for the network and its logits are upsampled bilinearly back to H x W."""
    height, width = rgb.shape[:2]
    batch = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    if max_side and max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        batch = TF.resize(batch, size, antialias=True)
    if isinstance(model, torch.nn.Module) and model.training:
        model.eval()  # once: eval() walks every submodule, 5 ms a call on the student
    x = to_model_input(batch, device=device)
    rows, cols = x.shape[-2:]
    if rows < MIN_SIDE or cols < MIN_SIDE:  # compress.py's forms take sides of 32 and more
        x = F.pad(x, (0, max(0, MIN_SIDE - cols), 0, max(0, MIN_SIDE - rows)), mode="replicate")
    logits = logits_of(model(x))[..., :rows, :cols]
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear",
                               align_corners=False)
    return logits


def segment(model, image, device="cpu", max_side=None):
    """The class of every pixel of a PIL ``image``: an (H, W) uint8 numpy array at the
    image's displayed size (``to_rgb``), computed exactly as evaluate.py predicts.

    ``model``: any module on ``device`` (put in eval mode here) or callable that returns
    logits or torchvision's ``{'out': logits}``; ``max_side`` as predict.py's --max-side."""
    rgb = to_rgb(image)
    return class_map(predict_logits(model, rgb, device, max_side))[0].to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------- models

def load_predictor(spec, device):
    """(model in eval mode, class names) for --model_path: a torchvision model by name, or a
    file this repo writes (``runtimes.load_any``: a checkpoint, compress.py's int8 .pt2 or
    .onnx, which run on the CPU: ``predict_device``)."""
    if spec in TORCHVISION_ARCHS and not Path(spec).exists():
        model, names = load_model(spec, "default"), default_class_names(21)
    elif not Path(spec).is_file():
        raise UserError(f"--model_path {spec}: no such file and no model name; pass a "
                        "checkpoint (models/NAME_last.pth) or one of "
                        f"{', '.join(TORCHVISION_ARCHS)}")
    else:
        model, record = load_any(spec)
        names = recorded_class_names(record)
    if isinstance(model, torch.nn.Module):
        model.to(device).eval()
    return model, names


def predict_device(spec, device):
    """The device --model_path runs on, known before it loads (onnxruntime reads the thread
    count when its session is made): compressed files on the CPU."""
    return runs_on(model_format(spec), device) if Path(spec).suffix.lower() in FORMATS \
        else device


# --------------------------------------------------------------------------- inputs

def collect_inputs(specs):
    """[(path, name)] for every input, and the folders nothing may be written into.

    A folder gives its image and video files, recursively, named by their path inside it;
    a file or a glob match is named by its stem. A name met twice gets its suffix added.
    """
    found, folders, taken = [], [], set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            folders.append(path.resolve())
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            found += [(p, p.relative_to(path).with_suffix("").as_posix()) for p in files]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{spec}: no such file or folder, and no file matches it as a glob")
            found += [(p, p.stem) for p in matches]
    named = []
    for path, name in found:
        if name in taken:
            name = f"{name}_{path.suffix.lstrip('.').lower()}"
        while name in taken:
            name += "_"
        taken.add(name)
        named.append((path, name))
    return named, folders


def check_out_dir(out, folders, inputs):
    """Refuse an --out at or inside an input folder, or that is an input file's own folder."""
    out = Path(out).resolve()
    for folder in folders:
        if out == folder or folder in out.parents:
            raise UserError(f"--out {out} is inside the input folder {folder}; nothing is written "
                            "into an input folder: pass an --out outside it")
    for path, _ in inputs:
        if out == path.resolve().parent:
            raise UserError(f"--out {out} is the folder of the input {path}; nothing is written "
                            "into an input folder: pass another --out")


# --------------------------------------------------------------------------- images

def open_image(path):
    """The decoded (H, W, 3) uint8 image of ``path``; a file that is no readable image
    raises ``UserError`` with the reason."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes now, so a truncated file fails here
            return to_rgb(image)
    except UnidentifiedImageError:
        raise UserError("not an image Pillow can read (corrupt, or another kind of file)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode ({one_line(exc, 160)})") from None


def output_paths(out, name, args):
    paths = {"mask": out / f"{name}_mask.png", "overlay": out / f"{name}_overlay.png"}
    if args.save_logits:
        paths["logits"] = out / f"{name}_logits.npy"
    if args.save_probs:
        paths["probs"] = out / f"{name}_probs.npy"
    return paths


def found_classes(mask, names):
    """{class name: share of the pixels} of the classes present, largest first."""
    counts = np.bincount(mask.ravel(), minlength=len(names))
    order = np.argsort(-counts, kind="stable")
    return {(names[k] if k < len(names) else f"class {k}"): round(float(counts[k]) / mask.size, 6)
            for k in order if counts[k]}


def save_npy(array, path):
    with open(path, "wb") as f:  # a file object: np.save would add .npy to a temporary name
        np.save(f, array)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def rgb_png(rgb):
    """The PNG file of an (H, W, 3) uint8 image: every row stored as its difference from the
    row above (PNG's "Up" filter), then Huffman-coded without zlib's search for repeated
    strings (Z_HUFFMAN_ONLY): faster than zlib's fastest level, for slightly larger files.
    Writing the overlay was most of predict's cost per image (docs/predict.md, "Speed")."""
    height, width = rgb.shape[:2]
    rows = np.ascontiguousarray(rgb).reshape(height, 3 * width)
    up = np.diff(rows, axis=0, prepend=np.zeros((1, 3 * width), np.uint8))  # modulo 256
    raw = np.concatenate([np.full((height, 1), 2, np.uint8), up], axis=1)  # 2: "Up"
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", huffman_deflate(raw.tobytes())) + png_chunk(b"IEND", b""))


def huffman_deflate(data):
    """A zlib stream of ``data``, which any zlib reader inflates, coded by Huffman alone."""
    stream = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_HUFFMAN_ONLY)
    return stream.compress(data) + stream.flush()


def write_outputs(paths, rgb, mask, logits):
    """The files of one image; the mask goes last, so that a killed run never leaves a
    mask whose image a rerun would skip with its overlay missing."""
    atomic_write(paths["overlay"], lambda tmp: Path(tmp).write_bytes(rgb_png(blend(rgb, mask))))
    for kind in ("logits", "probs"):
        if kind in paths:
            values = logits[0] if kind == "logits" else logits[0].float().softmax(0)
            array = values.cpu().numpy().astype(np.float16)
            atomic_write(paths[kind], lambda tmp, a=array: save_npy(a, tmp))
    atomic_write(paths["mask"], lambda tmp: save_mask(mask, tmp))


class Writer:
    """Writes an image's files on a thread while the next image is predicted (numpy and
    Pillow's PNG encoder release the GIL). One image's files wait at most; an error in
    writing is raised in the caller at the next ``submit`` or at ``close``."""

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), None

    def submit(self, fn, *args):
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self):
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def predict_image(model, path, paths, names, device, max_side, writer):
    """Segment one image file and hand its outputs to ``writer``; returns its
    predictions.json record (``ms``: decoding and predicting)."""
    start = time.perf_counter()
    rgb = open_image(path)
    model_start = time.perf_counter()
    try:
        logits = predict_logits(model, rgb, device, max_side)
    except (RuntimeError, AssertionError) as exc:  # out of memory, a compiled form's limits
        raise UserError(f"the model failed on this {rgb.shape[1]}x{rgb.shape[0]} image "
                        f"({one_line(exc, 160)}); try --max-side") from None
    mask = class_map(logits)[0].to(torch.uint8).cpu().numpy()
    model_ms = 1000 * (time.perf_counter() - model_start)
    writer.submit(write_outputs, paths, rgb, mask, logits)
    return {"source": str(path), "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
            "ms": round(1000 * (time.perf_counter() - start), 2), "model_ms": round(model_ms, 2),
            "classes": found_classes(mask, names),
            "files": {kind: p.name for kind, p in paths.items()}}


# --------------------------------------------------------------------------- video

def import_av():
    try:
        import av
    except ImportError:
        raise UserError(AV_MISSING) from None
    return av


def segment_frames(model, container, device, max_side=None):
    """(frame as (H, W, 3) uint8, its mask) for every frame of an open PyAV ``container``."""
    for frame in container.decode(video=0):
        rgb = frame.to_ndarray(format="rgb24")
        mask = class_map(predict_logits(model, rgb, device, max_side))[0]
        yield rgb, mask.to(torch.uint8).cpu().numpy()


def encode_overlay(av, model, source, dst, device, max_side, progress):
    """Write the overlay of every frame of ``source`` to ``dst`` at the source's size and
    frame rate (H.264; 4:2:0 needs even sides, 4:4:4 keeps an odd-sized video its size)."""
    stream = source.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    width, height = stream.codec_context.width, stream.codec_context.height
    frames = 0
    with av.open(str(dst), "w") as sink:
        out = sink.add_stream("libx264", rate=rate)
        out.width, out.height = width, height
        out.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        with tqdm(total=stream.frames or None, desc=Path(source.name).name, unit="frame",
                  disable=not progress, leave=False) as bar:
            for rgb, mask in segment_frames(model, source, device, max_side):
                sink.mux(out.encode(av.VideoFrame.from_ndarray(blend(rgb, mask), format="rgb24")))
                frames += 1
                bar.update()
        sink.mux(out.encode())
    return {"width": width, "height": height, "fps": float(rate), "frames": frames}


def predict_video(model, path, dst, device, max_side=None, progress=True):
    """Write the overlaid video of ``path`` to ``dst``; returns its predictions.json record.
    It is written to a temporary folder first: a broken or stopped video leaves no ``dst``
    that a rerun would skip."""
    av = import_av()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        try:
            with av.open(str(path)) as source:
                record = encode_overlay(av, model, source, Path(tmp) / dst.name, device,
                                        max_side, progress)
        except (av.FFmpegError, IndexError) as exc:  # IndexError: no video stream in it
            raise UserError(f"cannot decode the video ({one_line(exc, 160)})") from None
        (Path(tmp) / dst.name).replace(dst)
    seconds = time.perf_counter() - start
    return {"source": str(path), **record, "frames_per_s": round(record["frames"] / seconds, 2),
            "files": {"video": dst.name}}


# --------------------------------------------------------------------------- benchmark

def benchmark(model, inputs, names, device, args):
    """images/s of the model alone (its forward on each preprocessed image, as evaluate.py
    times it) and of predict as it runs (decoding, predicting, writing every output into a
    temporary folder, printing), at batch 1, interleaved round by round in one process
    after an untimed round of each."""
    inputs = [(p, n) for p, n in inputs if p.suffix.lower() not in VIDEO_SUFFIXES]
    batches = [to_model_input(torch.from_numpy(open_image(p)).permute(2, 0, 1)[None],
                              device=device) for p, _ in inputs]
    run_args = argparse.Namespace(**{**vars(args), "overwrite": True, "progress": False})
    seconds = {"model": 0.0, "predict": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):
            with torch.inference_mode():
                model_s = timed(lambda: [logits_of(model(x)) for x in batches], device)[1]
            with contextlib.redirect_stdout(io.StringIO()):  # its per-image lines, unseen
                predict_s = timed(lambda: predict_all(model, inputs, Path(tmp), run_args, names,
                                                      device), device)[1]
            if r:  # round 0 warms up
                seconds["model"] += model_s
                seconds["predict"] += predict_s
    images, rounds = len(inputs), args.rounds
    result = {kind: images * rounds / s for kind, s in seconds.items()}
    result.update(ratio=result["predict"] / result["model"], images=images, rounds=rounds,
                  hardware=device_name(device), threads=torch.get_num_threads())
    print(f"model alone {result['model']:.2f} images/s, predict.py {result['predict']:.2f} "
          f"images/s writing its outputs: {100 * result['ratio']:.1f}% ({images} images x "
          f"{rounds} rounds, batch 1, {result['hardware']})")
    path = Path(args.out) / "benchmark.json"
    save_json({**result, "model_path": str(args.model_path),
               "inputs": [str(p) for p, _ in inputs]}, path)
    print(f"written: {path}")
    return result


# --------------------------------------------------------------------------- the command

def read_predictions(path):
    """The records of an earlier run in the same --out (kept for the images it skips)."""
    try:
        return json.loads(path.read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_one(model, path, name, out, args, names, device, writer):
    """Predict one input; returns its record, or None when skipped as done."""
    if path.suffix.lower() in VIDEO_SUFFIXES:
        dst = out / f"{name}_overlay.mp4"
        if dst.exists() and not args.overwrite:
            return None
        dst.parent.mkdir(parents=True, exist_ok=True)
        record = predict_video(model, path, dst, device, args.max_side, args.progress)
        line = f"{record['frames']} frames, {record['frames_per_s']} frames/s -> {dst}"
    else:
        paths = output_paths(out, name, args)
        if all(p.exists() for p in paths.values()) and not args.overwrite:
            return None
        record = predict_image(model, path, paths, names, device, args.max_side, writer)
        top = ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(record["classes"].items())[:3])
        line = f"{record['width']}x{record['height']}, {record['ms']:.0f} ms: {top}"
    tqdm.write(f"{path}: {line}")
    return record


def predict_all(model, inputs, out, args, names, device):
    """Every input in turn; returns (records by name, skipped count, bad count)."""
    records, skipped, bad = read_predictions(out / "predictions.json"), 0, 0
    bar = tqdm(inputs, desc="predict", unit="file", disable=not args.progress)
    writer = Writer()
    try:
        for path, name in bar:
            try:
                record = run_one(model, path, name, out, args, names, device, writer)
            except UserError as exc:
                bad += 1
                tqdm.write(f"predict: {path}: {one_line(exc)}", file=sys.stderr)
                continue
            if record is None:
                skipped += 1
            else:
                records[name] = record
    finally:
        bar.close()
        writer.close()
        save_json({"model": str(args.model_path), "class_names": names, "images": records},
                  out / "predictions.json")
    return records, skipped, bad


def main(args):
    print(f"args: {vars(args)}")
    if not args.inputs:
        raise UserError("no INPUT given: pass images, folders, globs or videos to segment")
    inputs, folders = collect_inputs(args.inputs)
    check_out_dir(args.out, folders, inputs)
    if any(p.suffix.lower() in VIDEO_SUFFIXES for p, _ in inputs):
        import_av()  # before anything is written
    device = predict_device(args.model_path, resolve_device(args.device))
    print(f"device: {device}; " + set_compute_resources(args, device))
    model, names = load_predictor(args.model_path, device)
    if args.benchmark:
        return benchmark(model, inputs, names, device, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records, skipped, bad = predict_all(model, inputs, out, args, names, device)
    seconds = time.perf_counter() - start
    done = len(inputs) - skipped - bad
    print(f"{done} written to {out}/ ({done / seconds:.2f} images/s), {skipped} skipped "
          f"(outputs exist; --overwrite redoes them), {bad} unreadable")
    if bad:
        raise UserError(f"{bad} of {len(inputs)} inputs could not be read (each named above); "
                        f"the others were written to {out}")
    return records


if __name__ == "__main__":
    run_cli(main, get_args_parser())
