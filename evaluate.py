"""Evaluate a trained checkpoint on VOC val: mIoU, size, speed, and overlay images.

The model is rebuilt from the checkpoint alone (it records its architecture), or opened from
one of compress.py's files (int8 .pt2, .onnx: runtimes.load_any, on the CPU), and scored
by the same loop, metric and timing as test_teacher.py.

    python evaluate.py --model_path models/response_kd_last.pth --device auto
    python evaluate.py --model_path models/no_kd_last.pth --visualize --num_images 8
    python evaluate.py --model_path models/no_kd_last.pth --split select --data-root data/demo/TREE/students
    python evaluate.py --model_path models/compressed/no_kd_last_int8.pt2   # compress.py's files too
"""
import argparse
from pathlib import Path

import torch

from cli import HelpFormatter, UserError, run_cli
from compute import (add_compute_flags, count_params, resolve_device,
                     set_compute_resources)
from data import NUM_CLASSES, eval_loader, to_model_input
from distill import logits_of
from engine import class_map, evaluate_and_report
from files import save_json
from plots import save_overlay
from runtimes import load_any, model_format, runs_on


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model_path", "--model-path", required=True, dest="model_path",
                        help="a checkpoint written by train_kd.py (models/NAME_last.pth), or a "
                             "compressed file from compress.py (.pth, int8 .pt2, .onnx)")
    parser.add_argument("--data-root", default="./data", help="directory holding VOCdevkit/VOC2012")
    parser.add_argument("--no-download", action="store_true", help="never download VOC")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N val images")
    parser.add_argument("--split", default="val",
                        help="the split scored: VOC's val, or a split file of one's own "
                             "(ImageSets/Segmentation/NAME.txt)")
    add_compute_flags(parser)
    parser.add_argument("--amp", action="store_true", help="autocast the forward (CUDA/CPU)")
    parser.add_argument("--json", default=None,
                        help="results JSON (default outputs/<checkpoint name>_eval.json)")
    parser.add_argument("--visualize", action="store_true",
                        help="write [image | ground truth | prediction] overlays")
    parser.add_argument("--num_images", "--num-images", type=int, default=6, dest="num_images",
                        help="overlays to write: the best and the worst images by per-image mIoU")
    parser.add_argument("--output-dir", default="outputs", help="where the JSON and overlays go")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (for log files)")
    return parser


def pick_gallery(per_image_miou, per_image_gt_classes, count):
    """Indices of the best half and the worst half of ``count`` images by per-image mIoU.

    Images whose ground truth is background alone are passed over when others exist: a
    correct all-background answer is no success worth showing.
    """
    with_objects = [i for i, n in enumerate(per_image_gt_classes) if n > 1]
    candidates = with_objects or range(len(per_image_miou))
    scored = sorted((per_image_miou[i], i) for i in candidates if per_image_miou[i] is not None)
    worst = [i for _, i in scored[: count // 2]]
    best = [i for _, i in reversed(scored[len(worst):])][: count - len(worst)]
    return [("success", i) for i in best] + [("failure", i) for i in worst]


@torch.inference_mode()
def write_overlays(model, dataset, device, results, count, out_dir, title):
    """Predict the chosen images again (cheaper than keeping every prediction) and draw them."""
    model.eval()
    paths = []
    for kind, index in pick_gallery(results["per_image_miou"], results["per_image_gt_classes"],
                                    count):
        image, target = dataset[index]
        pred = class_map(logits_of(model(to_model_input(image[None], device=device))))[0].cpu()
        rgb = image.permute(1, 2, 0).numpy()  # the dataset's uint8 image, as decoded
        name = Path(dataset.images[index]).stem
        miou = results["per_image_miou"][index]
        path = Path(out_dir) / f"{kind}_{name}.png"
        save_overlay(rgb, target.numpy(), pred.numpy(), path,
                     title=f"{title} - {name}: image mIoU {100 * miou:.1f} ({kind})")
        paths.append(str(path))
    return paths


def main(args):
    print(f"args: {vars(args)}")
    device = runs_on(model_format(args.model_path), resolve_device(args.device))
    print(set_compute_resources(args, device))  # before loading: onnxruntime reads the threads
    model, ckpt = load_any(args.model_path)
    if args.amp and ckpt["format"] != "checkpoint":
        raise UserError(f"{args.model_path}: --amp autocasts a PyTorch checkpoint; a "
                        f"{ckpt['format']} model runs as compiled: leave --amp out")
    classes = ckpt["model_args"].get("num_classes", NUM_CLASSES)
    if classes != NUM_CLASSES:
        raise UserError(f"{args.model_path}: the model predicts {classes} classes, but PASCAL "
                        f"VOC has {NUM_CLASSES}; pass a checkpoint trained on VOC")
    loader = eval_loader(args.data_root, args.limit, args.workers, not args.no_download,
                         split=args.split)
    stem = Path(args.model_path).stem
    json_path = args.json or str(Path(args.output_dir) / f"{stem}_eval.json")
    arch = ckpt["model_args"]["arch"]
    extra = {"model": arch, "checkpoint": str(args.model_path), "epoch": ckpt.get("epoch"),
             "format": ckpt["format"], "source": ckpt.get("source"),
             "data_root": str(args.data_root), "split": args.split, "limit": args.limit,
             "amp": args.amp, "threads": args.threads, "workers": args.workers}
    # per-image scores only to pick the overlays: they cost a matrix and its scores per image
    results = evaluate_and_report(model, loader, device, f"{stem} ({arch})",
                                  ckpt.get("params") or count_params(model),
                                  None, extra, amp=args.amp, per_image=args.visualize,
                                  progress=args.progress)
    if args.visualize:
        out_dir = Path(args.output_dir) / f"{stem}_overlays"
        results["overlays"] = write_overlays(model, loader.dataset, device, results,
                                             args.num_images, out_dir, stem)
        print(f"overlays written to {out_dir}/")
    save_json(results, json_path)
    print(f"results written to {json_path}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser())
