"""Train the compact student on PASCAL VOC 2012, with or without knowledge distillation.

The loss: cross-entropy plus the weighted distillation terms, its formula in losses.py's
module docstring; each term is explained in docs/losses.md.

alpha = beta = 0 (and no --w-*) is plain training (the teacher is never built); alpha > 0
response KD; beta > 0 feature KD; both: combined. The distillation flags come from the one
table of terms, losses.TERMS. --kd-schedule warmup|step scales every distillation weight
per epoch. Each epoch appends a record to outputs/NAME/history.jsonl;
checkpoints go to models/NAME_{best,last}.pth; plots to plots/.

    python train_kd.py --out no_kd --epochs 30
    python train_kd.py --out response_kd --alpha 0.5 --tau 4 --epochs 30
    python train_kd.py --out feature_kd --beta 1.0 --epochs 30 --resume models/feature_kd_last.pth
    python train_kd.py --out combined_ema --alpha 0.5 --beta 1 --ema-decay 0.99
    python train_kd.py --out pixel_pair_kd --w-pixel 100 --w-pair 1 --teacher deeplabv3_resnet50
    python train_kd.py --out pruned_kd --init-from models/compressed/no_kd_last_pruned_channels_0.5.pth \
        --teacher lite --teacher-weights models/no_kd_last.pth --alpha 0.5 --epochs 10
    torchrun --nproc_per_node=4 train_kd.py --out combined_kd --alpha 0.5 --beta 1 --sync-bn

Ctrl-C or SIGTERM finishes the current step, writes NAME_last.pth (with the position inside
the epoch) and exits with 128 + the signal number; the same command with --resume auto
finishes the run as if it had never stopped (bit-identical on CPU). A kill -9 loses at most
the epoch in progress: checkpoints are written to a temporary file and renamed.
"""
import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from checkpoints import (RERUN, Interrupted, check_resume_fits,
                         checkpoint_state, exit_interrupted,
                         partial_for_this_process, read_history,
                         remove_stale_temporaries, resolve_resume,
                         restore_training_state, save_interrupted,
                         write_history)
from cli import (HelpFormatter, UserError, git_revision, one_line, ranged,
                 run_cli)
from compute import (Distributed, add_compute_flags, amp_dtype, count_params,
                     device_name, grad_scaler, resolve_device, seed_everything,
                     set_compute_resources)
from data import EpochSampler, build_dataset, eval_loader, loader
from distill import (build_distiller, build_optimizer, build_teacher, build_weight_average,
                     unwrapped)
from engine import NonFiniteLoss, StepCheck, evaluate, train_one_epoch
from files import StopRequest, save_json, torch_save
from losses import KD_SCHEDULES, TERMS, DistillationCriterion, add_term_flags
from nets import (BASELINE_STUDENTS, STUDENT_ARCHS, TEACHER_ARCHS,
                  build_student, model_from_checkpoint, read_checkpoint)
from plots import plot_history

POSITIVE_INT, POSITIVE = ranged(int, 1), ranged(float, 0, open_low=True)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=HelpFormatter)
    g = parser.add_argument_group("distillation (losses.TERMS)")
    add_term_flags(g)
    g.add_argument("--kd-schedule", default="constant", choices=KD_SCHEDULES,
                   help="progressive distillation: scale ALL distillation weights per epoch: "
                        "constant; warmup (linear from 0 at epoch 1 to full after "
                        "--kd-warmup-epochs); step (0 before --kd-step-epoch, full from it)")
    g.add_argument("--kd-warmup-epochs", type=ranged(int, 0), default=5,
                   help="epochs of the linear warm-up of --kd-schedule warmup")
    g.add_argument("--kd-step-epoch", type=POSITIVE_INT, default=10,
                   help="first epoch with distillation under --kd-schedule step")
    g.add_argument("--teacher", default="fcn_resnet50", choices=TEACHER_ARCHS + STUDENT_ARCHS,
                   help="teacher architecture (a compact one can teach in the offline demo)")
    # this help names the value 'default', and HelpFormatter leaves a help that speaks of a
    # default as it is: so it states its own
    g.add_argument("--teacher-weights", default="default",
                   help="'default' (torchvision's pretrained), 'none' (random) or PATH to a state "
                        "dict or a checkpoint of this repo (default: %(default)s)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=POSITIVE_INT, default=30,
                   help="number of training epochs")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=8,
                   help="training images per step")
    g.add_argument("--lr", type=POSITIVE, default=1e-3,
                   help="initial learning rate")
    g.add_argument("--weight-decay", type=ranged(float, 0), default=1e-4,
                   help="weight decay")
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                   help="AdamW, or SGD with momentum 0.9")
    g.add_argument("--scheduler", default="poly", choices=("plateau", "poly", "cosine"),
                   help="learning-rate schedule, stepped once per epoch (plateau watches val "
                        "mIoU)")
    g.add_argument("--ema-decay", type=ranged(float, 0, 0.99999), default=0.0, metavar="D",
                   help="validate and save an exponential moving average of the weights, "
                        "updated after every step with this decay (0.99: about the last 100 "
                        "steps), instead of the last step's; 0: off")
    g = parser.add_argument_group("model and data")
    g.add_argument("--student", default="lite", choices=STUDENT_ARCHS + BASELINE_STUDENTS,
                   help="student: 'lite' (depthwise-separable), 'lab', or torchvision's "
                        "lraspp_mobilenet_v3_large as an off-the-shelf baseline (no feature "
                        "taps: logit terms only)")
    g.add_argument("--init-from", default=None, metavar="PATH",
                   help="start from the weights of this checkpoint (any this repo writes, a "
                        "channel-pruned one included): the student is rebuilt from its "
                        "model_args, overriding --student; optimizer and epochs start fresh. "
                        "Fine-tuning a pruned student: --teacher lite --teacher-weights "
                        "models/NAME_last.pth (the unpruned one)")
    g.add_argument("--no-pretrained-backbone", dest="pretrained_backbone", action="store_false",
                   help="start the student's MobileNetV3 backbone from random weights, not "
                        "ImageNet (default: ImageNet weights from torch's hub cache)")
    g.add_argument("--crop-size", type=POSITIVE_INT, default=480,
                   help="square training crop, padded")
    g.add_argument("--scale-range", type=POSITIVE, nargs=2, default=(0.5, 2.0),
                   metavar=("MIN", "MAX"), help="random rescale range of training images "
                                                "before the crop (default: 0.5 2.0)")
    g.add_argument("--train-set", default="voc", choices=("voc", "trainaug"),
                   help="'voc' (1,464 images) or 'trainaug' (VOC + SBD, 10,582 images; SBD is "
                        "downloaded when missing)")
    g.add_argument("--data-root", default="./data",
                   help="directory holding VOCdevkit/VOC2012")
    g.add_argument("--sbd-root", default=None, help="SBD directory (default: DATA_ROOT/SBD)")
    g.add_argument("--no-download", action="store_true", help="never download VOC or SBD")
    g.add_argument("--limit-train", type=int, default=None,
                   help="use the first N train images (default: all)")
    g.add_argument("--limit-val", type=int, default=None,
                   help="use the first N val images (default: all)")
    g.add_argument("--val-split", default="val",
                   help="the split validated during training, on which NAME_best.pth is chosen: "
                        "VOC's val, or a split file of one's own (the demo's 'select'), so that "
                        "the set a table reports chooses nothing")
    g = parser.add_argument_group("running")
    add_compute_flags(g)
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: fp16 with loss scaling on CUDA (and on MPS from torch "
                        "2.8; bf16 before), bf16 on a CPU")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed (data order, crops, init); on a CPU, two runs with the same "
                        "seed and flags write bit-identical checkpoints")
    g.add_argument("--deterministic", action="store_true",
                   help="ask PyTorch for deterministic kernels (cuDNN, cuBLAS); slower on CUDA, "
                        "and ops without one are listed as warnings (docs/training.md)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on CUDA: BatchNorm statistics over the whole global "
                        "batch (SyncBatchNorm), for small per-GPU batches")
    g.add_argument("--val-every", type=POSITIVE_INT, default=1, metavar="N",
                   help="validate after every N-th epoch and after the last; the checkpoint "
                        "and history are written every epoch")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs only)")
    g.add_argument("--log-every", type=ranged(int, 0), default=0, metavar="N",
                   help="also print the running loss every N steps, for log files (default: "
                        "0, per epoch only)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="student",
                   help="run name: models/NAME_*.pth, outputs/NAME/")
    g.add_argument("--resume", default=None, metavar="PATH|auto",
                   help="continue from this checkpoint (NAME_last.pth); 'auto': from the run's "
                        "own last checkpoint if it has one, else start it (default: a new run)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over even if outputs/NAME already holds a run")
    g.add_argument("--model-dir", default="models",
                   help="where checkpoints go")
    g.add_argument("--output-dir", default="outputs",
                   help="where history and summary go")
    g.add_argument("--plot-dir", default="plots", help="where the plots go")
    return parser


# the whole-set scores of the last validation (per-image lists are per process under torchrun)
VAL_KEYS = ("miou", "pixel_accuracy", "mean_class_accuracy", "per_class_iou", "num_images",
            "confusion_matrix")
RANK_SEED_STRIDE = 100_003  # other processes of a torchrun job draw other augmentations
TAP_READS = {"taps", "adapted", "preact"}  # what a student without feature taps cannot give


@dataclass
class Run:
    """Everything one training run holds, built by ``build`` and advanced by ``fit``."""
    args: Any
    world: Any  # compute.Distributed: this process's place in a torchrun job
    device: torch.device
    paths: dict
    log: Any
    resume: Optional[dict] = None
    loaders: dict = field(default_factory=dict)
    student: Any = None
    adapters: Any = None
    criterion: Any = None
    distiller: Any = None  # student, adapters, teacher (DDP-wrapped student/adapters: torchrun)
    average: Any = None  # the weight average (--ema-decay), validated and saved as the model
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    start_epoch: int = 0
    rerun: str = RERUN  # how the stop message says to continue
    stopped_by: Optional[int] = None  # the signal of a stop that came with the last step
    best_miou: float = -1.0
    partial: Optional[dict] = None
    records: list = field(default_factory=list)


def check_args(args):
    """What the parser's ranges cannot see: terms that read taps a student does not have."""
    if args.student in STUDENT_ARCHS:
        return
    for name, term in TERMS.items():
        if getattr(args, term.weight.dest) > 0 and term.reads & TAP_READS:
            raise UserError(f"{term.weight.flags[0]} needs feature taps, and --student "
                            f"{args.student} has none; use --student lite or lab, or distil it "
                            "with the logit terms only (--alpha, --w-cwd)")


def build_scheduler(args, optimizer):
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                          patience=3)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: (1 - epoch / args.epochs) ** 0.9)


def set_deterministic():
    """Deterministic kernels where PyTorch has them; the others warn (docs/training.md)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first call
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------- build

def start(args, world):
    """Device, logging, the run's files, and the checkpoint to resume from (if any)."""
    if args.deterministic:
        set_deterministic()
    else:
        # fixed-size training crops: cuDNN picks its fastest kernels once per shape
        # (engine.evaluate turns this off around full-size images, whose shapes all differ)
        torch.backends.cudnn.benchmark = True
    device = world.device or resolve_device(args.device)
    if args.sync_bn and world.enabled and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm runs on GPUs only); "
                        "drop it for a CPU run")
    log = print if world.is_main else (lambda *a, **k: None)
    if not world.is_main:  # one process prints
        args.progress, args.log_every = False, 0
    run_dir = Path(args.output_dir) / args.out
    paths = {"run": run_dir, "history": run_dir / "history.jsonl",
             "last": Path(args.model_dir) / f"{args.out}_last.pth",
             "best": Path(args.model_dir) / f"{args.out}_best.pth"}
    paths["resume"] = resolve_resume(args, paths["history"], paths["last"])
    resume = read_checkpoint(paths["resume"]) if paths["resume"] else None
    saved = (resume.get("args") or {}).get("threads") if resume is not None else None
    reuse = args.threads is None and saved is not None
    if reuse:  # CPU results are bit-identical only at equal thread counts: keep the run's
        args.threads = saved
    resources = set_compute_resources(args, device)
    log(f"args: {vars(args)}")
    log(f"device: {device} ({device_name(device)}), git: {git_revision()}"
        + (f", {world.world_size} processes (torchrun)" if world.enabled else ""))
    log(resources.replace("--threads", "the resumed run's count; --threads overrides")
        if reuse else resources)
    return Run(args, world, device, paths, log, resume)


def build_loaders(run):
    """The training set is cropped to a fixed size, so it batches; val is full size."""
    args, world = run.args, run.world
    train_set = build_dataset(args.data_root, "train", args.train_set, args.crop_size,
                              args.limit_train, not args.no_download, args.sbd_root,
                              scale=tuple(args.scale_range))
    if len(train_set) // world.world_size < args.batch_size:
        share = f" ({len(train_set) // world.world_size} per process)" if world.enabled else ""
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set "
                        f"({len(train_set)} images{share}); lower --batch-size")
    cuda = run.device.type == "cuda"
    val = eval_loader(args.data_root, args.limit_val, args.workers, not args.no_download,
                      split=args.val_split, rank=world.rank, world_size=world.world_size,
                      pin_memory=cuda)
    # every sample's augmentation is seeded by (seed, epoch, index): the same for any number
    # of workers and any start method, so the workers can persist across epochs; under
    # torchrun each process reads its own share of every epoch's permutation
    sampler = EpochSampler(len(train_set), args.seed, world.rank, world.world_size)
    # drop_last: a final batch of one image would break BatchNorm's batch statistics
    train = loader(train_set, args.batch_size, sampler, args.workers, pin_memory=cuda,
                   drop_last=True)
    run.loaders = {"train": train, "val": val, "sampler": sampler}


def build_models(run):
    """Student, criterion and, when a term is on, the frozen teacher and the adapters, as the
    criterion's terms ask (losses.TERMS: what each reads)."""
    args, device = run.args, run.device
    seed_everything(args.seed)
    student = initial_student(run)
    if run.resume is not None:
        check_resume_fits(run.resume, run.paths["resume"], student, args, run.log)
        # the backbone came from the run's first start: record what that start used
        args.pretrained_backbone = (run.resume.get("args") or {}).get("pretrained_backbone",
                                                                      args.pretrained_backbone)
    if args.sync_bn and run.world.enabled:
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    run.student = student.to(device)
    run.criterion = DistillationCriterion.from_args(args)
    teacher = build_teacher(run.criterion, args.teacher, args.teacher_weights)
    # the unwrapped student and adapters are saved and evaluated; DDP averages their gradients
    ddp = (lambda m: DistributedDataParallel(
        m, device_ids=[device.index] if device.type == "cuda" else None)) \
        if run.world.enabled else None
    run.distiller = build_distiller(run.student, run.criterion,
                                    None if teacher is None else teacher.to(device), ddp)
    run.average = build_weight_average(run.student, args.ema_decay)
    if run.distiller.adapters is not None:
        run.adapters = unwrapped(run.distiller.adapters)
    run.optimizer = build_optimizer(args.optimizer, run.distiller.trainable_parameters(),
                                    args.lr, args.weight_decay, run.device)
    run.scheduler = build_scheduler(args, run.optimizer)
    run.scaler = grad_scaler(device, args.amp)
    run.log(f"student {args.student}: {count_params(student):,} inference parameters"
            + (f" (+{count_params(run.adapters):,} adapter parameters, training only)"
               if run.adapters else ""))


def initial_student(run):
    """The student before training: --init-from's checkpoint rebuilt with its weights (its
    own architecture and widths), or a new --student (its backbone from ImageNet unless
    --no-pretrained-backbone)."""
    args = run.args
    if args.init_from is None:
        # resuming: the backbone's weights come from the checkpoint, not the hub cache
        return build_student(args.student,
                             pretrained_backbone=args.pretrained_backbone and run.resume is None)
    student, _ = model_from_checkpoint(args.init_from)
    arch = student.model_args["arch"]
    if arch not in STUDENT_ARCHS + BASELINE_STUDENTS:
        raise UserError(f"--init-from {args.init_from}: a {arch} is not a student this script "
                        f"trains; pass a checkpoint of {', '.join(STUDENT_ARCHS + BASELINE_STUDENTS)}")
    if arch != args.student:
        run.log(f"--init-from: the student is the checkpoint's {arch} (not --student {args.student})")
        args.student = arch
        check_args(args)  # the terms that read taps, against the student actually trained
    run.log(f"--init-from: weights of {args.init_from}"
            + (" (channel-pruned widths)" if "widths" in student.model_args else ""))
    return student


def restore(run):
    """Continue from the resumed checkpoint: weights, optimizer, epoch, the partial epoch."""
    if run.resume is not None:
        try:
            run.start_epoch, run.best_miou, partial = restore_training_state(
                run.resume, run.student, run.adapters, run.optimizer, run.scheduler, run.scaler,
                run.average)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UserError(f"{run.paths['resume']}: does not fit this run ({type(exc).__name__}"
                            f": {one_line(exc, 150)}); resume with the run's own flags (--student, "
                            "--alpha/--beta/--w-*) or start a new --out") from None
        run.partial = partial_for_this_process(partial, run.world, run.log)
        where = (f", inside epoch {run.partial['epoch']} at step {run.partial['step']}"
                 if run.partial else "")
        run.log(f"resumed from {run.paths['resume']} after epoch {run.start_epoch}{where} (best "
                f"mIoU {run.best_miou:.4f})")
        run.records = read_history(run.paths["history"], run.start_epoch)
    if run.world.is_main:
        remove_stale_temporaries(run.args.out, run.args.model_dir, run.paths["run"])


# --------------------------------------------------------------------------- fit

def training_state(run, epoch):
    """The checkpoint of ``run`` after ``epoch`` finished epochs."""
    return checkpoint_state(run.student, run.adapters, run.optimizer, run.scheduler, run.scaler,
                            epoch, run.args, run.best_miou, average=run.average)


def train_epoch(run, epoch, stop):
    """One epoch of training, seeded from the epoch alone; a stop saves and exits here.
    Returns (mean losses, the epoch's start on the perf_counter clock)."""
    args, world, last = run.args, run.world, run.paths["last"]
    # reseeding per epoch makes a resumed run draw the same dropout (the crops and flips
    # are seeded per sample: data.EpochSampler)
    torch.manual_seed(args.seed + epoch + RANK_SEED_STRIDE * world.rank)  # dropout
    run.loaders["sampler"].set_epoch(epoch)
    run.criterion.set_epoch(epoch)  # progressive distillation: weights from the epoch alone
    partial = run.partial if run.partial is not None and run.partial["epoch"] == epoch else None
    started = time.perf_counter() - (partial.get("seconds", 0.0) if partial else 0.0)
    try:
        losses = train_one_epoch(run.distiller, run.criterion, run.optimizer,
                                 run.loaders["train"], run.device, epoch,
                                 amp_dtype(run.device, args.amp), run.scaler, args.log_every,
                                 args.progress, StepCheck(stop, world), partial, run.average)
    except NonFiniteLoss as exc:
        kept = f"the last good checkpoint {last} is untouched" if last.exists() \
            else "no checkpoint was written"
        raise UserError(f"{exc}; {kept}. Usual remedies: a lower --lr (now {args.lr:g}); no "
                        f"--amp, so that every term runs in fp32; a lower --tau (now "
                        f"{args.tau:g})") from None
    except Interrupted as exc:
        record = save_interrupted(exc, training_state(run, epoch - 1), last, world,
                                  time.perf_counter() - started)
        exit_interrupted(stop, world, last,
                         f"epoch {epoch}, step {record['step']}/{len(run.loaders['train'])}",
                         run.rerun)
    except UserError as exc:  # a broken file met mid-run: what was saved stays
        if run.resume is None and epoch == 1:
            raise  # nothing saved by this run yet
        raise UserError(f"{one_line(exc)}; the last checkpoint {last} is intact: fix this, "
                        "then rerun with --resume auto") from None
    run.partial = None
    return losses, started


def validate(run, epoch):
    """Whole-set validation scores, or None in an epoch that --val-every skips."""
    if epoch % run.args.val_every and epoch != run.args.epochs:
        return None
    model = run.student if run.average is None else run.average.module  # what is saved
    if run.world.enabled:  # DDP let each process update its BatchNorm statistics on its share
        run.world.broadcast_buffers(model)
    return evaluate(model, run.loaders["val"], run.device, warmup=0, desc="val",
                    progress=run.args.progress, reduce=run.world.sum)


def validate_and_save(run, epoch, losses, started):
    """Validation (when due), the learning-rate step, the history record, the checkpoints;
    ``started``: the epoch's start on the perf_counter clock."""
    train_seconds = time.perf_counter() - started
    val = validate(run, epoch)
    lr = run.optimizer.param_groups[0]["lr"]
    if not isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step()
    elif val is not None:  # plateau watches val mIoU
        run.scheduler.step(val["miou"])
    improved = val is not None and val["miou"] > run.best_miou
    run.best_miou = max(run.best_miou, val["miou"]) if val is not None else run.best_miou
    if run.world.is_main:
        run.records.append({"epoch": epoch, "lr": lr, **losses,
                            "val_miou": val and val["miou"],
                            "val_pixel_accuracy": val and val["pixel_accuracy"],
                            "train_seconds": train_seconds,
                            "epoch_seconds": time.perf_counter() - started,
                            "weights": run.criterion.weights()})
        # history first: a kill before the checkpoint only repeats this epoch
        write_history(run.records, run.paths["history"])
        if val is not None:
            save_json({"epoch": epoch, **{k: val[k] for k in VAL_KEYS}},
                      run.paths["run"] / "val_last.json")
        if improved:
            torch_save(training_state(run, epoch), run.paths["best"])
        torch_save(training_state(run, epoch), run.paths["last"])
    terms = " ".join(f"{k[5:]}={v:.4f}" for k, v in losses.items())
    scores = (f"val mIoU {100 * val['miou']:.2f} (best {100 * run.best_miou:.2f})"
              if val is not None else "not validated (--val-every)")
    run.log(f"epoch {epoch}/{run.args.epochs}: {terms} | {scores} | lr {lr:.2e} | "
            f"{time.perf_counter() - started:.1f}s")


def fit(run):
    """The epochs left to train; returns the wall time of this session's training."""
    stop, begin = StopRequest(verbose=run.world.is_main), time.perf_counter()
    with stop:
        for epoch in range(run.start_epoch + 1, run.args.epochs + 1):
            losses, started = train_epoch(run, epoch, stop)
            validate_and_save(run, epoch, losses, started)
            if run.world.any(stop.requested)[0] and epoch < run.args.epochs:
                exit_interrupted(stop, run.world, run.paths["last"], f"the end of epoch {epoch}",
                                 run.rerun)
    run.stopped_by = stop.signum  # a stop during the last step: the run is complete anyway
    return time.perf_counter() - begin


def summarise(run, seconds):
    """Plots and summary.json of the finished run; the summary is returned."""
    args, records = run.args, run.records
    plots = plot_history(run.paths["history"], args.plot_dir, args.out)
    summary = {"name": args.out, "student": args.student, "alpha": args.alpha, "beta": args.beta,
               "tau": args.tau, "teacher": args.teacher if run.criterion.active() else None,
               "pretrained_backbone": args.pretrained_backbone,
               "epochs": args.epochs, "best_miou": run.best_miou,
               "final_miou": records[-1]["val_miou"] if records else None,
               "params": count_params(run.student),
               "train_seconds_total": sum(r["epoch_seconds"] for r in records),
               "train_seconds_this_session": seconds, "processes": run.world.world_size,
               "device": str(run.device), "hardware": device_name(run.device),
               "git": git_revision(), "best_checkpoint": str(run.paths["best"]),
               "last_checkpoint": str(run.paths["last"]), "plots": [str(p) for p in plots],
               "stopped_by": run.stopped_by, "args": vars(args)}
    save_json(summary, run.paths["run"] / "summary.json")
    print(f"training time {summary['train_seconds_total'] / 60:.1f} min; best val mIoU "
          f"{100 * run.best_miou:.2f}; checkpoints {run.paths['best']}, {run.paths['last']}; "
          f"plots {', '.join(map(str, plots))}")
    return summary


def train(args, world, rerun=RERUN):
    """build -> restore -> fit -> summarise."""
    run = start(args, world)
    run.rerun = rerun
    build_loaders(run)
    build_models(run)
    restore(run)
    seconds = fit(run)
    return summarise(run, seconds) if world.is_main else None


def main(args, rerun=RERUN):
    """Train; ``rerun`` is what a stop tells the user to run to continue (sweep.py's and
    demo.py's own commands, which resume their runs themselves)."""
    check_args(args)
    world = Distributed.from_env(args.device)
    try:
        return train(args, world, rerun)
    finally:
        world.close()


if __name__ == "__main__":
    run_cli(main, get_args_parser())
