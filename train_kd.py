"""Train the compact student on PASCAL VOC 2012, with or without knowledge distillation.

    L = (1 - alpha) * CE(y, z_s) + alpha * tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau))
        + beta * mean over taps of (1 - cos(A(f_s), f_t))

        + w_pixel * L_pi + w_pair * L_pa + w_at * AT + w_cwd * CWD     (README: further methods)

alpha = beta = 0 (and no --w-*) is plain training (the teacher is never built); alpha > 0
response KD; beta > 0 feature KD; both: combined. --kd-schedule warmup|step scales every
distillation weight per epoch. Each epoch appends a record to outputs/NAME/history.jsonl;
checkpoints go to models/NAME_{best,last}.pth; plots to plots/.

    python train_kd.py --out no_kd --epochs 30
    python train_kd.py --out response_kd --alpha 0.5 --tau 4 --epochs 30
    python train_kd.py --out feature_kd --beta 1.0 --epochs 30 --resume models/feature_kd_last.pth
    python train_kd.py --out pixel_pair_kd --w-pixel 100 --w-pair 1 --teacher deeplabv3_resnet50
"""
import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data import build_dataset, eval_loader
from engine import (NonFiniteLoss, checkpoint_state, evaluate, restore_training_state,
                    train_one_epoch)
from losses import KD_SCHEDULES, DistillationCriterion
from nets import (BASELINE_STUDENTS, STUDENT_ARCHS, TEACHER_ARCHS, FrozenTeacher, build_student,
                  load_model, read_checkpoint)
from plots import plot_history
from student_model import FeatureAdapters
from utils import (UserError, count_params, device_name, git_revision, resolve_device,
                   save_json, seed_everything, torch_save, run_cli)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("distillation")
    g.add_argument("--alpha", type=float, default=0.0,
                   help="weight of the Hinton KD term; CE gets 1 - alpha (0 = no response KD)")
    g.add_argument("--beta", type=float, default=0.0,
                   help="weight of the cosine feature term, averaged over the low/mid/high taps")
    g.add_argument("--tau", "--temp", type=float, default=4.0, dest="tau",
                   help="softmax temperature of the KD term (--temp is an alias)")
    g.add_argument("--w-pixel", type=float, default=0.0,
                   help="weight of the pixel-wise pre-activation loss L_pi on the last layer "
                        "before the classifier (seed paper: 100)")
    g.add_argument("--w-pair", type=float, default=0.0,
                   help="weight of the pair-wise similarity loss L_pa on the encoder's 'high' "
                        "tap, 3x3 nodes (seed paper: 1)")
    g.add_argument("--w-at", type=float, default=0.0,
                   help="weight of attention transfer, averaged over the low/mid/high taps")
    g.add_argument("--w-cwd", type=float, default=0.0,
                   help="weight of channel-wise distillation (CWD) on the logits")
    g.add_argument("--cwd-tau", type=float, default=4.0, help="temperature of the CWD term")
    g.add_argument("--kd-schedule", default="constant", choices=KD_SCHEDULES,
                   help="progressive distillation: scale ALL distillation weights per epoch: "
                        "constant; warmup (linear from 0 at epoch 1 to full after "
                        "--kd-warmup-epochs); step (0 before --kd-step-epoch, full from it)")
    g.add_argument("--kd-warmup-epochs", type=int, default=5,
                   help="epochs of the linear warm-up of --kd-schedule warmup")
    g.add_argument("--kd-step-epoch", type=int, default=10,
                   help="first epoch with distillation under --kd-schedule step")
    g.add_argument("--teacher", default="fcn_resnet50", choices=TEACHER_ARCHS + STUDENT_ARCHS,
                   help="teacher architecture (a compact one can teach in the offline demo)")
    g.add_argument("--teacher-weights", default="default",
                   help="'default' (torchvision's pretrained), 'none' (random) or PATH to a state "
                        "dict or a checkpoint of this repo")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30, help="number of training epochs")
    g.add_argument("--batch-size", type=int, default=8, help="training images per step")
    g.add_argument("--lr", type=float, default=1e-3, help="initial learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                   help="AdamW, or SGD with momentum 0.9")
    g.add_argument("--scheduler", default="poly", choices=("plateau", "poly", "cosine"),
                   help="learning-rate schedule, stepped once per epoch (plateau watches val mIoU)")
    g = parser.add_argument_group("model and data")
    g.add_argument("--student", default="lite", choices=STUDENT_ARCHS + BASELINE_STUDENTS,
                   help="student: 'lite' (depthwise-separable, default), 'lab', or torchvision's "
                        "lraspp_mobilenet_v3_large as an off-the-shelf baseline (no feature "
                        "taps: --alpha and --w-cwd only)")
    g.add_argument("--no-pretrained-backbone", dest="pretrained_backbone", action="store_false",
                   help="start the student's MobileNetV3 backbone from random weights, not "
                        "ImageNet")
    g.add_argument("--crop-size", type=int, default=480, help="square training crop (padded)")
    g.add_argument("--scale-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                   help="random rescale range of training images before the crop")
    g.add_argument("--train-set", default="voc", choices=("voc", "trainaug"),
                   help="'voc' (1,464 images) or 'trainaug' (VOC + SBD, 10,582 images)")
    g.add_argument("--data-root", default="./data", help="directory holding VOCdevkit/VOC2012")
    g.add_argument("--sbd-root", default=None, help="SBD directory (default DATA_ROOT/SBD)")
    g.add_argument("--no-download", action="store_true", help="never download VOC")
    g.add_argument("--limit-train", type=int, default=None, help="use the first N train images")
    g.add_argument("--limit-val", type=int, default=None, help="use the first N val images")
    g = parser.add_argument_group("running")
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N, mps or cpu")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision (fp16 on CUDA with loss scaling, bf16 on CPU)")
    g.add_argument("--seed", type=int, default=0, help="random seed (data order, crops, init)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs only)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="student", help="run name: models/NAME_*.pth, outputs/NAME/")
    g.add_argument("--resume", default=None, help="continue from this checkpoint (NAME_last.pth)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over even if outputs/NAME already holds a run")
    g.add_argument("--model-dir", default="models", help="where checkpoints go")
    g.add_argument("--output-dir", default="outputs", help="where history and summary go")
    g.add_argument("--plot-dir", default="plots", help="where the plots go")
    return parser


def build_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def build_scheduler(args, optimizer):
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                          patience=3)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: (1 - epoch / args.epochs) ** 0.9)


def check_args(args):
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha}: must lie in [0, 1] (CE gets 1 - alpha)")
    if args.beta < 0 or args.tau <= 0:
        raise UserError("--beta must be >= 0 and --tau > 0")
    for flag in ("w_pixel", "w_pair", "w_at", "w_cwd"):
        if not getattr(args, flag) >= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.cwd_tau <= 0:
        raise UserError("--cwd-tau must be > 0")
    if args.kd_warmup_epochs < 0 or args.kd_step_epoch < 1:
        raise UserError("--kd-warmup-epochs must be >= 0 and --kd-step-epoch >= 1")
    if args.student not in STUDENT_ARCHS:  # an off-the-shelf baseline has no feature taps
        for flag in ("beta", "w_pixel", "w_pair", "w_at"):
            if getattr(args, flag) > 0:
                raise UserError(f"--{flag.replace('_', '-')} needs feature taps, and --student "
                                f"{args.student} has none; use --student lite or lab, or "
                                "distil it with --alpha / --w-cwd only")
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        raise UserError("--epochs and --batch-size must be >= 1 and --lr > 0")


def kd_weights_on(args):
    """True when any distillation term is on (otherwise the teacher is never built)."""
    return any(getattr(args, flag) > 0
               for flag in ("alpha", "beta", "w_pixel", "w_pair", "w_at", "w_cwd"))


def main(args):
    check_args(args)
    device = resolve_device(args.device)
    print(f"args: {vars(args)}")
    print(f"device: {device} ({device_name(device)}), git: {git_revision()}")
    run_dir = Path(args.output_dir) / args.out
    history_path = run_dir / "history.jsonl"
    last_path = Path(args.model_dir) / f"{args.out}_last.pth"
    best_path = Path(args.model_dir) / f"{args.out}_best.pth"
    if history_path.exists() and not args.resume and not args.overwrite:
        raise UserError(f"{history_path} exists: run {args.out!r} was trained before; pass "
                        f"--resume {last_path} to continue it, --overwrite to start over, or "
                        "another --out")
    resume = read_checkpoint(args.resume) if args.resume else None

    # data: the training set is cropped to a fixed size, so it batches; val is full size
    train_set = build_dataset(args.data_root, "train", args.train_set, args.crop_size,
                              args.limit_train, not args.no_download, args.sbd_root,
                              scale=tuple(args.scale_range))
    if len(train_set) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set "
                        f"({len(train_set)} images); lower --batch-size")
    val_loader = eval_loader(args.data_root, args.limit_val, args.workers, not args.no_download)
    generator = torch.Generator()
    # drop_last: a final batch of one image would break BatchNorm's batch statistics
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers, drop_last=True, generator=generator,
                              pin_memory=device.type == "cuda")

    seed_everything(args.seed)
    student = build_student(args.student,
                            pretrained_backbone=args.pretrained_backbone and resume is None)
    student.to(device)
    distil = kd_weights_on(args)
    teacher = adapters = None
    if distil:  # with every distillation weight 0 the teacher is never built
        teacher = FrozenTeacher(load_model(args.teacher, args.teacher_weights), args.teacher,
                                preact=args.w_pixel > 0)
        teacher.to(device)
        if args.beta > 0:
            adapters = FeatureAdapters(student.FEATURE_CHANNELS, teacher.channels).to(device)
    criterion = DistillationCriterion(
        args.alpha, args.beta, args.tau, pixel=args.w_pixel, pair=args.w_pair, at=args.w_at,
        cwd=args.w_cwd, cwd_tau=args.cwd_tau, schedule=args.kd_schedule,
        warmup_epochs=args.kd_warmup_epochs, step_epoch=args.kd_step_epoch)
    params = list(student.parameters()) + (list(adapters.parameters()) if adapters else [])
    optimizer = build_optimizer(args, params)
    scheduler = build_scheduler(args, optimizer)
    amp_dtype = (torch.float16 if device.type in ("cuda", "mps") else torch.bfloat16) if args.amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

    start_epoch, best_miou = 0, -1.0
    if resume is not None:
        try:
            start_epoch, best_miou = restore_training_state(resume, student, adapters, optimizer,
                                                            scheduler, scaler)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"{args.resume}: does not fit this run ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:150]}); resume with the run's own "
                            "flags (--student, --alpha/--beta/--w-*) or start a new --out") from None
        print(f"resumed from {args.resume} at epoch {start_epoch} (best mIoU {best_miou:.4f})")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        history_path.write_text("")
    else:  # drop records of epochs the checkpoint does not hold (killed after logging)
        kept = [line for line in history_path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] <= start_epoch] \
            if history_path.exists() else []
        history_path.write_text("".join(line + "\n" for line in kept))

    print(f"student {args.student}: {count_params(student):,} inference parameters"
          + (f" (+{count_params(adapters):,} adapter parameters, training only)" if adapters else ""))
    train_start = time.perf_counter()
    for epoch in range(start_epoch + 1, args.epochs + 1):
        # reseeding per epoch makes a resumed run draw the same crops, flips and dropout
        torch.manual_seed(args.seed + epoch)
        generator.manual_seed(args.seed + epoch)
        criterion.set_epoch(epoch)  # progressive distillation: weights from the epoch alone
        tic = time.perf_counter()
        try:
            losses = train_one_epoch(student, criterion, optimizer, train_loader, device, epoch,
                                     teacher, adapters, scaler, amp_dtype, args.progress)
        except NonFiniteLoss as exc:
            kept = f"the last good checkpoint {last_path} is untouched" if last_path.exists() \
                else "no checkpoint was written"
            raise UserError(f"{exc}; {kept}. Try a lower --lr, training without --amp, or a "
                            "lower --tau") from None
        train_seconds = time.perf_counter() - tic
        val = evaluate(student, val_loader, device, warmup=0, desc="val", progress=args.progress)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["miou"])
        else:
            scheduler.step()
        record = {"epoch": epoch, "lr": lr, **losses, "val_miou": val["miou"],
                  "val_pixel_accuracy": val["pixel_accuracy"], "train_seconds": train_seconds,
                  "epoch_seconds": time.perf_counter() - tic, "weights": criterion.weights()}
        with open(history_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        improved = val["miou"] > best_miou
        best_miou = max(best_miou, val["miou"])
        state = checkpoint_state(student, adapters, optimizer, scheduler, scaler, epoch, args,
                                 best_miou)
        if improved:
            torch_save(state, best_path)
        torch_save(state, last_path)
        terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in losses.items())
        print(f"epoch {epoch}/{args.epochs}: {terms} | val mIoU {100 * val['miou']:.2f} "
              f"(best {100 * best_miou:.2f}) | lr {lr:.2e} | {record['epoch_seconds']:.1f}s")
    train_time = time.perf_counter() - train_start

    plots = plot_history(history_path, args.plot_dir, args.out)
    records = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
    summary = {"name": args.out, "student": args.student, "alpha": args.alpha, "beta": args.beta,
               "tau": args.tau, "teacher": args.teacher if distil else None,
               "epochs": args.epochs, "best_miou": best_miou,
               "final_miou": records[-1]["val_miou"] if records else None,
               "params": count_params(student),
               "train_seconds_total": sum(r["epoch_seconds"] for r in records),
               "train_seconds_this_session": train_time,
               "device": str(device), "hardware": device_name(device), "git": git_revision(),
               "best_checkpoint": str(best_path), "last_checkpoint": str(last_path),
               "plots": [str(p) for p in plots], "args": vars(args)}
    save_json(summary, run_dir / "summary.json")
    print(f"training time {summary['train_seconds_total'] / 60:.1f} min; best val mIoU "
          f"{100 * best_miou:.2f}; checkpoints {best_path}, {last_path}; plots {', '.join(map(str, plots))}")
    return summary


if __name__ == "__main__":
    run_cli(main, get_args_parser())
