"""The checkpoint schema, the per-epoch history, and stopping and resuming a training run.

One schema for every checkpoint this repo writes (``model_record``, ``checkpoint_state``):
``model`` (a state dict) and ``model_args`` (``{'arch', 'num_classes'}``), so a checkpoint
rebuilds its model alone, and ``class_names`` (the names predict.py reports); a training
checkpoint adds what resuming needs: optimizer, scheduler, scaler, finished ``epoch``,
``args``, ``best_miou``, the adapters, and for a run stopped mid-epoch a ``partial`` record
(step, loss sums, the random state of every process); a run with a weight average
(--ema-decay) saves the average as ``model`` and its training weights as ``train_model``.

Stop and resume: Ctrl-C or SIGTERM asks the training loop to stop after its step
(``files.StopRequest``); the loop raises ``Interrupted`` with the partial record,
``save_interrupted`` writes it into NAME_last.pth and ``exit_interrupted`` ends the process
with 128 + the signal number. ``--resume auto`` finds that file (``resolve_resume``), and the
loop replays the epoch's first batches and the random state (engine.train_one_epoch), so the
resumed run is bit-identical to an unbroken one on a CPU.
"""
import json
import signal
import sys
from pathlib import Path

import torch

from cli import UserError
from data import VOC_CLASSES
from files import atomic_write, torch_save

# train_kd.py's flags that leave what a run trains alone: where files go, how the run is
# shown, what computes it and with which kernels (CPU bits depend on the thread count, but a
# resume reuses the run's own), and what validation scores. Every other flag shapes the
# training: that list is derived (training_flags), so a new flag is compared on resume
# without being listed, and resuming with another value of it gives another run.
NOT_TRAINING = frozenset({"out", "resume", "overwrite", "model_dir", "output_dir", "plot_dir",
                          "data_root", "sbd_root", "no_download", "progress", "log_every",
                          "device", "workers", "threads", "deterministic", "sync_bn",
                          "val_every", "val_split", "limit_val"})


def training_flags(args):
    """The dests of train_kd.py's ``args`` that shape the training: all but NOT_TRAINING."""
    return [dest for dest in vars(args) if dest not in NOT_TRAINING]


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); ``partial`` records the epoch's progress so far."""

    def __init__(self, partial):
        super().__init__(f"interrupted at epoch {partial['epoch']}, step {partial['step']}")
        self.partial = partial


# --------------------------------------------------------------------------- the schema

def default_class_names(num_classes):
    """The names of a model's classes where nothing records others: VOC's for 21 classes."""
    if num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return [f"class {k}" for k in range(num_classes)]


def model_record(model, **extra):
    """The part of every checkpoint that rebuilds the model alone (nets.model_from_checkpoint),
    and ``class_names``, which predict.py names what it finds with (a model's own
    ``class_names`` attribute where it has one)."""
    names = getattr(model, "class_names", None) or default_class_names(
        model.model_args["num_classes"])
    return {"model": model.state_dict(), "model_args": dict(model.model_args),
            "class_names": list(names), **extra}


def recorded_class_names(ckpt):
    """A checkpoint's class names; VOC's (``default_class_names``) for one that predates them."""
    return list(ckpt.get("class_names")
                or default_class_names(ckpt["model_args"].get("num_classes", len(VOC_CLASSES))))


def checkpoint_state(student, adapters, optimizer, scheduler, scaler, epoch, args, best_miou,
                     partial=None, average=None):
    """A training checkpoint: the model record plus enough to resume exactly.

    ``epoch`` counts finished epochs; ``partial``, for a run stopped mid-epoch, records the
    progress of the next one (``Interrupted.partial``, with the random state of every
    process as a list by rank). The adapters are saved apart: they are not needed for
    inference. With a weight ``average`` (--ema-decay), ``model`` holds the average, which
    every reader of a checkpoint evaluates and deploys, and ``train_model`` the weights
    that training goes on from, with ``ema_updates``, the average's count of updates.
    """
    trained = {} if average is None else {"train_model": student.state_dict(),
                                          "ema_updates": int(average.n_averaged)}
    return model_record(
        student if average is None else average.module,
        adapters=adapters.state_dict() if adapters is not None else None,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        scaler=scaler.state_dict() if scaler is not None else None, epoch=epoch,
        args=dict(args) if not hasattr(args, "__dict__") else vars(args), best_miou=best_miou,
        partial=partial, **trained)


def restore_training_state(ckpt, student, adapters, optimizer, scheduler, scaler, average=None):
    """Load a checkpoint written by ``checkpoint_state``; returns (finished epochs, best mIoU,
    the partial record of the epoch in progress or None)."""
    student.load_state_dict(ckpt.get("train_model", ckpt["model"]))
    if average is not None:
        if "train_model" not in ckpt:  # a run without an average: it cannot be made up
            raise KeyError("train_model (the run was trained without --ema-decay)")
        average.module.load_state_dict(ckpt["model"])
        average.n_averaged.fill_(ckpt["ema_updates"])
    if adapters is not None:
        if ckpt.get("adapters") is None:
            raise KeyError("adapters")
        adapters.load_state_dict(ckpt["adapters"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"], ckpt["best_miou"], ckpt.get("partial")


# --------------------------------------------------------------------------- history

def read_history(path, up_to_epoch=None):
    """The per-epoch records of a history.jsonl (those the checkpoint holds, when given)."""
    path = Path(path)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_epoch is None or r["epoch"] <= up_to_epoch]


def write_history(records, path):
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n"
                                                                for r in records)))


# --------------------------------------------------------------------------- resuming

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
               else f"pass a checkpoint with {wanted['num_classes']} classes"
               if saved.get("num_classes") != wanted["num_classes"]
               else "resume with the run's own --init-from (the layer widths differ)")
        pruned = lambda model_args: "channel-pruned " if model_args.get("widths") else ""
        raise UserError(f"{path}: checkpoint is a {pruned(saved)}{saved.get('arch')} with "
                        f"{saved.get('num_classes')} classes, but this run trains a "
                        f"{pruned(wanted)}{wanted['arch']} with {wanted['num_classes']}; {fix}, "
                        "or start a new --out")
    as_json = lambda v: json.dumps(list(v) if isinstance(v, tuple) else v)
    old, new = ckpt.get("args") or {}, vars(args)
    differ = [f"--{k.replace('_', '-')} {as_json(old[k])} -> {as_json(new[k])}"
              for k in training_flags(args) if k in old and as_json(old[k]) != as_json(new[k])]
    if differ:
        log(f"warning: resuming with flags that differ from the checkpoint's run: "
            f"{'; '.join(differ)}")


def partial_for_this_process(partial, world, log):
    """The mid-epoch record to finish, with this process's random state; None to restart it."""
    if partial is None:
        return None
    if partial.get("world_size", 1) != world.world_size:
        log(f"the checkpoint stopped inside epoch {partial['epoch']} with "
            f"{partial.get('world_size', 1)} process(es) and this run has {world.world_size}: "
            "that epoch restarts from its beginning")
        return None
    return {**partial, "rng": partial["rng"][world.rank]}


def remove_stale_temporaries(name, model_dir, run_dir):
    """Temporary files a kill -9 left mid-write (the files they were to replace are intact)."""
    for pattern, folder in ((f".{name}_*.pth.*.tmp", Path(model_dir)),
                            (".history.jsonl.*.tmp", run_dir), (".summary.json.*.tmp", run_dir)):
        for tmp in folder.glob(pattern):
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- stopping

def rng_state():
    """The random state the training step draws from: CPU, and CUDA or MPS when present
    (dropout on a GPU draws from the GPU's generator)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def save_interrupted(exc, state, path, world, seconds):
    """Write the checkpoint of a run stopped mid-epoch: ``state`` (``checkpoint_state``
    without ``partial``) plus the partial record of every process."""
    record = {**exc.partial, "rng": world.gather(exc.partial["rng"]),
              "world_size": world.world_size, "seconds": seconds}
    if world.is_main:
        torch_save({**state, "partial": record}, path)
    world.barrier()
    return record


RERUN = "rerun the same command with --resume auto"


def exit_interrupted(stop, world, last_path, where, rerun=RERUN):
    """After a stop request: say where the run stopped and how to finish it (``rerun``:
    a sweep or the demo says its own command), then exit."""
    signum = stop.signum or signal.SIGTERM  # another process of the job may have received it
    if world.is_main:
        print(f"stopped by {signal.Signals(signum).name} at {where}; {last_path} holds the run "
              f"so far. To finish it, {rerun}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)
