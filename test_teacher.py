"""Lab step 1: evaluate the pretrained teacher (torchvision FCN-ResNet50) on PASCAL VOC 2012 val.

Full-resolution mIoU over the whole val set from one confusion matrix, pixel accuracy, a
per-class IoU table, parameters, and speed (median model time per image, batch 1).

    python test_teacher.py --data-root ./data --device auto
    python test_teacher.py --data-root data/synth --weights none --limit 5 --device cpu --json out.json
    python test_teacher.py --data-root ./data --weights models/teacher_synth_best.pth

This file is a deliverable of the lab, not a unit test: pytest is pointed at tests/ only.
"""
import argparse

from cli import HelpFormatter, run_cli
from compute import (add_compute_flags, count_params, resolve_device,
                     set_compute_resources)
from data import eval_loader
from engine import evaluate_and_report
from nets import TEACHER_ARCHS, load_model


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    # model
    parser.add_argument("--arch", default="fcn_resnet50", choices=TEACHER_ARCHS,
                        help="torchvision segmentation model to evaluate")
    parser.add_argument("--weights", default="default",
                        help="'default' (torchvision's pretrained, downloaded once), 'none' "
                             "(random init), or PATH to a state dict or a checkpoint of this repo")
    # data
    parser.add_argument("--data-root", default="./data",
                        help="directory holding VOCdevkit/VOC2012 (downloaded there when missing)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download VOC; fail with instructions when it is missing")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N val images (quick checks)")
    # running and output
    add_compute_flags(parser)
    parser.add_argument("--amp", action="store_true", help="autocast the forward (CUDA/CPU)")
    parser.add_argument("--json", default="outputs/teacher_eval.json",
                        help="where to write the results as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (for log files)")
    return parser


def main(args):
    print(f"args: {vars(args)}")
    device = resolve_device(args.device)
    print(set_compute_resources(args, device))
    loader = eval_loader(args.data_root, args.limit, args.workers, download=not args.no_download)
    model = load_model(args.arch, args.weights)
    # what shapes the number, so that pack.py --check can rerun like with like
    extra = {"model": args.arch, "weights": args.weights, "data_root": str(args.data_root),
             "split": "val", "limit": args.limit, "amp": args.amp, "threads": args.threads,
             "workers": args.workers}
    evaluate_and_report(model, loader, device, f"teacher {args.arch}", count_params(model),
                        args.json, extra, amp=args.amp, progress=args.progress)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
