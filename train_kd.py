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
    torchrun --nproc_per_node=4 train_kd.py --out combined_kd --alpha 0.5 --beta 1 --sync-bn

Ctrl-C or SIGTERM finishes the current step, writes NAME_last.pth (with the position inside
the epoch) and exits with 128 + the signal number; the same command with --resume auto
finishes the run as if it had never stopped (bit-identical on CPU). A kill -9 loses at most
the epoch in progress: checkpoints are written to a temporary file and renamed.
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from data import build_dataset, eval_loader
from engine import (Interrupted, NonFiniteLoss, checkpoint_state, evaluate,
                    restore_training_state, train_one_epoch)
from losses import KD_SCHEDULES, DistillationCriterion
from nets import (BASELINE_STUDENTS, STUDENT_ARCHS, TEACHER_ARCHS, FrozenTeacher, build_student,
                  load_model, read_checkpoint)
from plots import plot_history
from student_model import FeatureAdapters
from utils import (Distributed, StopRequest, UserError, atomic_write, count_params,
                   device_name, git_revision, one_line, quiet_worker, resolve_device, run_cli,
                   save_json, seed_everything, torch_save)


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
    g.add_argument("--seed", type=int, default=0,
                   help="random seed (data order, crops, init); on a CPU, two runs with the same "
                        "seed and flags write bit-identical checkpoints")
    g.add_argument("--deterministic", action="store_true",
                   help="ask PyTorch for deterministic kernels (cuDNN, cuBLAS); slower on CUDA, "
                        "and ops without one are listed as warnings (README: Determinism)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics over the whole global "
                        "batch (SyncBatchNorm), for small per-GPU batches")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs only)")
    g.add_argument("--log-every", type=int, default=0, metavar="N",
                   help="also print the running loss every N steps (for log files; 0: per "
                        "epoch only)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="student", help="run name: models/NAME_*.pth, outputs/NAME/")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from this checkpoint (NAME_last.pth); 'auto': from the run's "
                        "own last checkpoint if it has one, else start it")
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
    if args.log_every < 0:
        raise UserError("--log-every must be >= 0 (0: per-epoch logs only)")


def kd_weights_on(args):
    """True when any distillation term is on (otherwise the teacher is never built)."""
    return any(getattr(args, flag) > 0
               for flag in ("alpha", "beta", "w_pixel", "w_pair", "w_at", "w_cwd"))


# flags that shape the training itself: resuming with other values gives another run
TRAINING_FLAGS = ("student", "pretrained_backbone", "alpha", "beta", "tau", "w_pixel", "w_pair",
                  "w_at", "w_cwd", "cwd_tau", "kd_schedule", "kd_warmup_epochs", "kd_step_epoch", "teacher",
                  "teacher_weights", "epochs", "batch_size", "lr", "weight_decay", "optimizer",
                  "scheduler", "crop_size", "scale_range", "train_set", "limit_train", "seed",
                  "amp")
# the whole-set scores of the last validation (per-image lists are per process under torchrun)
VAL_KEYS = ("miou", "pixel_accuracy", "mean_class_accuracy", "per_class_iou", "num_images",
            "confusion_matrix")
RANK_SEED_STRIDE = 100_003  # other processes of a torchrun job draw other augmentations


def resolve_resume(args, history_path, last_path):
    """The checkpoint to resume from (None: a new run); never clobbers an earlier run."""
    if args.resume == "auto":
        if last_path.exists():
            return last_path
        print(f"--resume auto: run {args.out!r} has no checkpoint yet ({last_path}); starting it")
        return None
    if args.resume:
        return Path(args.resume)
    ran_before = last_path.exists() or (history_path.exists() and history_path.stat().st_size > 0)
    if ran_before and not args.overwrite:
        raise UserError(f"run {args.out!r} exists ({history_path if history_path.exists() else last_path}); "
                        f"pass --resume auto (its {last_path}) to continue it, --overwrite to "
                        "start over, or another --out")
    return None


def check_resume_fits(ckpt, path, student, args, log):
    """Refuse a checkpoint of another model; warn about flags that differ from its run's."""
    saved = ckpt.get("model_args") or {}
    wanted = dict(student.model_args)
    if saved and saved != wanted:
        fix = (f"resume with --student {saved.get('arch')}" if saved.get("arch") != wanted["arch"]
               else f"pass a checkpoint with {wanted['num_classes']} classes")
        raise UserError(f"{path}: checkpoint is a {saved.get('arch')} with "
                        f"{saved.get('num_classes')} classes, but this run trains a "
                        f"{wanted['arch']} with {wanted['num_classes']}; {fix}, or start a new "
                        "--out")
    as_json = lambda v: json.dumps(list(v) if isinstance(v, tuple) else v)
    old, new = ckpt.get("args") or {}, vars(args)
    differ = [f"--{k.replace('_', '-')} {as_json(old[k])} -> {as_json(new[k])}"
              for k in TRAINING_FLAGS if k in old and as_json(old[k]) != as_json(new[k])]
    if differ:
        log(f"warning: resuming with flags that differ from the checkpoint's run: "
            f"{'; '.join(differ)}")


def partial_for_this_process(partial, dist, log):
    """The mid-epoch record to finish, with this process's random state; None to restart it."""
    if partial is None:
        return None
    if partial.get("world_size", 1) != dist.world_size:
        log(f"the checkpoint stopped inside epoch {partial['epoch']} with "
            f"{partial.get('world_size', 1)} process(es) and this run has {dist.world_size}: "
            "that epoch restarts from its beginning")
        return None
    return {**partial, "rng": partial["rng"][dist.rank]}


def set_deterministic():
    """Deterministic kernels where PyTorch has them; the others warn (README: Determinism)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first call
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def remove_stale_temporaries(args, run_dir):
    """Temporary files a kill -9 left mid-write (the files they were to replace are intact)."""
    for pattern, folder in ((f".{args.out}_*.pth.*.tmp", Path(args.model_dir)),
                            (".history.jsonl.*.tmp", run_dir), (".summary.json.*.tmp", run_dir)):
        for tmp in folder.glob(pattern):
            tmp.unlink(missing_ok=True)


def read_history(path, up_to_epoch):
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] <= up_to_epoch]  # epochs the checkpoint holds


def write_history(records, path):
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n"
                                                                for r in records)))


def main(args):
    check_args(args)
    dist = Distributed.from_env(args.device)
    try:
        return train(args, dist)
    finally:
        dist.close()


def train(args, dist):
    if args.deterministic:
        set_deterministic()
    device = dist.device or resolve_device(args.device)
    if args.sync_bn and dist.enabled and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm runs on GPUs only); "
                        "drop it for a CPU run")
    log = print if dist.is_main else (lambda *a, **k: None)
    progress = args.progress and dist.is_main
    log(f"args: {vars(args)}")
    log(f"device: {device} ({device_name(device)}), git: {git_revision()}"
        + (f", {dist.world_size} processes (torchrun)" if dist.enabled else ""))
    run_dir = Path(args.output_dir) / args.out
    history_path = run_dir / "history.jsonl"
    last_path = Path(args.model_dir) / f"{args.out}_last.pth"
    best_path = Path(args.model_dir) / f"{args.out}_best.pth"
    resume_path = resolve_resume(args, history_path, last_path)
    resume = read_checkpoint(resume_path) if resume_path else None

    # data: the training set is cropped to a fixed size, so it batches; val is full size
    train_set = build_dataset(args.data_root, "train", args.train_set, args.crop_size,
                              args.limit_train, not args.no_download, args.sbd_root,
                              scale=tuple(args.scale_range))
    if len(train_set) // dist.world_size < args.batch_size:
        share = f" ({len(train_set) // dist.world_size} per process)" if dist.enabled else ""
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set "
                        f"({len(train_set)} images{share}); lower --batch-size")
    val_loader = eval_loader(args.data_root, args.limit_val, args.workers, not args.no_download,
                             rank=dist.rank, world_size=dist.world_size)
    generator = torch.Generator()
    # torchrun: each process reads its own share of every epoch's permutation
    sampler = DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True,
                                 seed=args.seed, drop_last=True) if dist.enabled else None
    # drop_last: a final batch of one image would break BatchNorm's batch statistics
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None,
                              sampler=sampler, num_workers=args.workers, drop_last=True,
                              generator=generator, pin_memory=device.type == "cuda",
                              worker_init_fn=quiet_worker)

    seed_everything(args.seed)
    student = build_student(args.student,
                            pretrained_backbone=args.pretrained_backbone and resume is None)
    if resume is not None:
        check_resume_fits(resume, resume_path, student, args, log)
        # the backbone came from the run's first start: record what that start used
        args.pretrained_backbone = (resume.get("args") or {}).get("pretrained_backbone",
                                                                  args.pretrained_backbone)
    if args.sync_bn and dist.enabled:
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device)
    distil = kd_weights_on(args)
    teacher = adapters = None
    if distil:  # with every distillation weight 0 the teacher is never built
        # every process holds its own frozen copy; it has no gradients to synchronise, so it
        # is never wrapped in DistributedDataParallel
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

    start_epoch, best_miou, partial = 0, -1.0, None
    if resume is not None:
        try:
            start_epoch, best_miou, partial = restore_training_state(
                resume, student, adapters, optimizer, scheduler, scaler)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"{resume_path}: does not fit this run ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:150]}); resume with the run's own "
                            "flags (--student, --alpha/--beta/--w-*) or start a new --out") from None
        partial = partial_for_this_process(partial, dist, log)
        where = f", inside epoch {partial['epoch']} at step {partial['step']}" if partial else ""
        log(f"resumed from {resume_path} after epoch {start_epoch}{where} (best mIoU "
            f"{best_miou:.4f})")
    records = read_history(history_path, start_epoch) if resume is not None else []
    if dist.is_main:
        remove_stale_temporaries(args, run_dir)
    # DDP averages the gradients over the processes; the unwrapped modules are what is
    # evaluated and saved
    ddp = (lambda m: DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda"
                                             else None)) if dist.enabled else (lambda m: m)
    train_student = ddp(student)
    train_adapters = ddp(adapters) if adapters is not None else None

    log(f"student {args.student}: {count_params(student):,} inference parameters"
        + (f" (+{count_params(adapters):,} adapter parameters, training only)" if adapters else ""))
    stop = StopRequest(verbose=dist.is_main)
    check = lambda nonfinite: dist.any(nonfinite, stop.requested)  # same decision on every rank
    train_start = time.perf_counter()
    with stop:
        for epoch in range(start_epoch + 1, args.epochs + 1):
            # reseeding per epoch makes a resumed run draw the same crops, flips and dropout
            torch.manual_seed(args.seed + epoch + RANK_SEED_STRIDE * dist.rank)
            generator.manual_seed(args.seed + epoch + RANK_SEED_STRIDE * dist.rank)
            if sampler is not None:
                sampler.set_epoch(epoch)
            criterion.set_epoch(epoch)  # progressive distillation: weights from the epoch alone
            resuming = partial if partial is not None and partial["epoch"] == epoch else None
            tic = time.perf_counter() - (resuming.get("seconds", 0.0) if resuming else 0.0)
            try:
                losses = train_one_epoch(train_student, criterion, optimizer, train_loader, device,
                                         epoch, teacher, train_adapters, scaler, amp_dtype,
                                         progress, check, resuming,
                                         args.log_every if dist.is_main else 0)
            except NonFiniteLoss as exc:
                kept = (f"the last good checkpoint {last_path} is untouched"
                        if last_path.exists() else "no checkpoint was written")
                raise UserError(f"{exc}; {kept}. Usual remedies: a lower --lr (now {args.lr:g}); "
                                "no --amp, so that every term runs in fp32; a lower --tau (now "
                                f"{args.tau:g})") from None
            except Interrupted as exc:
                record = {**exc.partial, "rng": dist.gather(exc.partial["rng"]),
                          "world_size": dist.world_size, "seconds": time.perf_counter() - tic}
                if dist.is_main:
                    torch_save(checkpoint_state(student, adapters, optimizer, scheduler, scaler,
                                                epoch - 1, args, best_miou, partial=record),
                               last_path)
                dist.barrier()
                exit_interrupted(stop, dist, last_path,
                                 f"epoch {epoch}, step {record['step']}/{len(train_loader)}")
            except UserError as exc:  # a broken file met mid-run: what was saved stays
                if resume is None and epoch == 1:
                    raise  # nothing saved by this run yet
                raise UserError(f"{one_line(exc)}; the last checkpoint {last_path} is intact: "
                                "fix this, then rerun with --resume auto") from None
            partial = None
            train_seconds = time.perf_counter() - tic
            if dist.enabled:  # DDP let each process update its BatchNorm statistics on its share
                dist.broadcast_buffers(student)
            val = evaluate(student, val_loader, device, warmup=0, desc="val", progress=progress,
                           reduce=dist.sum)
            lr = optimizer.param_groups[0]["lr"]
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val["miou"])
            else:
                scheduler.step()
            improved = val["miou"] > best_miou
            best_miou = max(best_miou, val["miou"])
            if dist.is_main:
                records.append({"epoch": epoch, "lr": lr, **losses, "val_miou": val["miou"],
                                "val_pixel_accuracy": val["pixel_accuracy"],
                                "train_seconds": train_seconds,
                                "epoch_seconds": time.perf_counter() - tic,
                                "weights": criterion.weights()})
                # history first: a kill before the checkpoint only repeats this epoch
                write_history(records, history_path)
                save_json({"epoch": epoch, **{k: val[k] for k in VAL_KEYS}},
                          run_dir / "val_last.json")
                state = checkpoint_state(student, adapters, optimizer, scheduler, scaler, epoch,
                                         args, best_miou)
                if improved:
                    torch_save(state, best_path)
                torch_save(state, last_path)
            terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in losses.items())
            log(f"epoch {epoch}/{args.epochs}: {terms} | val mIoU {100 * val['miou']:.2f} "
                f"(best {100 * best_miou:.2f}) | lr {lr:.2e} | "
                f"{time.perf_counter() - tic:.1f}s")
            if dist.any(stop.requested)[0] and epoch < args.epochs:
                exit_interrupted(stop, dist, last_path, f"the end of epoch {epoch}")
    train_time = time.perf_counter() - train_start
    if not dist.is_main:
        return None

    plots = plot_history(history_path, args.plot_dir, args.out)
    summary = {"name": args.out, "student": args.student, "alpha": args.alpha, "beta": args.beta,
               "tau": args.tau, "teacher": args.teacher if distil else None,
               "pretrained_backbone": args.pretrained_backbone,
               "epochs": args.epochs, "best_miou": best_miou,
               "final_miou": records[-1]["val_miou"] if records else None,
               "params": count_params(student),
               "train_seconds_total": sum(r["epoch_seconds"] for r in records),
               "train_seconds_this_session": train_time, "processes": dist.world_size,
               "device": str(device), "hardware": device_name(device), "git": git_revision(),
               "best_checkpoint": str(best_path), "last_checkpoint": str(last_path),
               "plots": [str(p) for p in plots], "args": vars(args)}
    save_json(summary, run_dir / "summary.json")
    print(f"training time {summary['train_seconds_total'] / 60:.1f} min; best val mIoU "
          f"{100 * best_miou:.2f}; checkpoints {best_path}, {last_path}; plots {', '.join(map(str, plots))}")
    return summary


def exit_interrupted(stop, dist, last_path, where):
    """After a stop request: say where the run stopped and how to finish it, then exit."""
    signum = stop.signum or signal.SIGTERM  # another process of the job may have received it
    if dist.is_main:
        print(f"stopped by {signal.Signals(signum).name} at {where}; {last_path} holds the run "
              "so far. To finish it, rerun the same command with --resume auto", file=sys.stderr,
              flush=True)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
