"""Small helpers shared by the entry scripts: devices, seeds, atomic files, user errors,
interrupt requests and the process's place in a torchrun job.

Nothing here knows about models or data; it sits at the bottom of the import graph.
"""
import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

REPO_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, broken input).

    Entry scripts print its message as one line and exit with status 2, without a
    traceback: the message itself names the cause and the fix.
    """


def one_line(exc):
    """The message of ``exc`` as one line.

    A ``UserError`` raised inside a DataLoader worker comes back wrapped in a message
    holding the worker's traceback; its last line is ``module.UserError: <message>``.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that keeps the docstring's layout and names every flag's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)"
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


def ranged(kind=float, low=-math.inf, high=math.inf, open_low=False):
    """An argparse ``type=`` that also checks the range: ``low`` <= x (< x when ``open_low``)
    <= ``high``, x finite. Every range is checked there, once, as the flag is parsed."""
    def parse(text):
        value = kind(text)
        if not (math.isfinite(value) and (value > low if open_low else value >= low)
                and value <= high):
            bounds = ("> " if open_low else ">= ") + f"{low:g}" if high == math.inf \
                else f"{'(' if open_low else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{text} is out of range: use a number {bounds}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid float value" names it
    return parse


def reason(exc, limit=160):
    """The message of ``exc`` on one line, cut to ``limit`` characters (for error lines)."""
    return " ".join(str(exc).split())[:limit]


def load_pretrained(build, weights, what, fix):
    """``build()``, which loads torchvision's ``weights``; a failed download becomes one line.

    torch reads its hub cache before it downloads, so the message names the exact file that
    an offline user can place there, and ``fix``, the flag that does without it.
    """
    try:
        return build()
    except (urllib.error.URLError, OSError, RuntimeError) as exc:  # offline, or a broken file
        name = weights.url.rsplit("/", 1)[-1]
        raise UserError(f"could not load {what} ({reason(exc)}); offline, copy {name} into "
                        f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or {fix}") from None


def run_cli(main, parser):
    """Parse the arguments, run ``main(args)``, turn a ``UserError`` into a one-line exit."""
    args = parser.parse_args()
    try:
        main(args)
    except KeyboardInterrupt:  # Ctrl-C outside the part of a run that saves a checkpoint
        print("error: interrupted (Ctrl-C); nothing was saved by this step", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as exc:
        # A UserError raised in a DataLoader worker is re-raised here as a RuntimeError
        # when its class cannot be rebuilt from the wrapped message.
        if "UserError" in str(exc):
            print(f"error: {one_line(exc)}", file=sys.stderr)
            sys.exit(2)
        raise


def nvidia_gpu_without_cuda_torch():
    """True when an NVIDIA GPU answers (nvidia-smi) but this torch build has no CUDA: the
    torch wheels pip brings on Windows are CPU-only, whatever the machine has."""
    if torch.version.cuda is not None or shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_device(name):
    """Map ``auto|cuda|cuda:N|mps|cpu`` to a ``torch.device``, failing clearly if unavailable."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if nvidia_gpu_without_cuda_torch():
            print(f"warning: this machine has an NVIDIA GPU, but torch {torch.__version__} is "
                  "built without CUDA, so this runs on the CPU, many times slower; install the "
                  "CUDA build of torch from PyTorch's install selector "
                  "(https://pytorch.org/get-started/locally/)", file=sys.stderr)
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; "
                            "use --device cpu (or auto)")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a device name; use cuda or cuda:N") from None
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} CUDA device(s), "
                            f"cuda:0 to cuda:{count - 1}; pick one of those")
        return device
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: Apple MPS is not available on this machine; "
                            "use --device cpu (or auto)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {name!r} is unknown; use auto, cuda, cuda:N, mps or cpu")


# torch's own default (physical cores, or OMP_NUM_THREADS), read before any script changes it
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def add_compute_flags(parser, device="auto", workers=True):
    """--device (unless ``device`` is None), --workers and --threads, the same in every
    script that computes."""
    if device is not None:
        parser.add_argument("--device", default=device,
                            help="auto (CUDA, then Apple MPS, then CPU), cuda, cuda:N, mps or cpu "
                                 "(default: %(default)s)")
    if workers:
        parser.add_argument("--workers", type=ranged(int, 0), default=None,
                            help="DataLoader worker processes (default: auto: on a GPU one per "
                                 "core up to 8; on a CPU, where they take cores from the "
                                 "network, one per 8 cores)")
    parser.add_argument("--threads", type=ranged(int, 1), default=None,
                        help="PyTorch's CPU threads in this process (default: auto: the cores "
                             "that the workers and other busy programs leave free, measured at "
                             "start; CPU results are bit-identical only at equal counts)")


def usable_cores():
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(seconds=0.3):
    """How many cores other programs keep busy: the machine's CPU use over ``seconds``
    (psutil; this process sleeps meanwhile), rounded to whole cores."""
    import psutil
    percent = psutil.cpu_percent(interval=seconds)
    return int(percent / 100 * (os.cpu_count() or 1) + 0.5)


def default_workers(device, cores):
    """On a GPU the loader is the limit: one worker per core, up to 8. On a CPU every worker
    takes a core from the network's threads; loading is a small share of a CPU step, so
    workers pay only on large machines."""
    if device.type in ("cuda", "mps"):
        return min(8, cores)
    return min(4, cores // 8)


def set_compute_resources(args, device, busy=None):
    """Resolve ``args.workers`` (when the parser has it) and ``args.threads`` in place, set
    torch's thread count, and return the line that says why.

    Threads: the cores left when the workers and the programs already busy at start have
    taken theirs, at least 1 and at most torch's default. Oversubscribed cores stall PyTorch's
    threads many-fold, while one thread fewer costs far less (docs/benchmark.md).
    """
    cores = usable_cores()
    if getattr(args, "workers", 0) is None:
        args.workers = default_workers(device, cores)
    workers = getattr(args, "workers", 0)
    if args.threads is None:
        busy = busy_cores() if busy is None else busy
        args.threads = max(1, min(TORCH_DEFAULT_THREADS, cores - busy - workers))
        why = f"auto: {cores} cores, {workers} workers, {busy} busy with other programs"
    else:
        why = "--threads"
    torch.set_num_threads(args.threads)
    return f"threads: {args.threads} ({why}); workers: {workers}"


def synchronize(device):
    """Wait for queued kernels so wall-clock timings measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device):
    """A human-readable name of the hardware behind ``device`` (for reports)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def mps_grad_scaler_supported():
    """PyTorch scales fp16 losses on MPS from 2.8 on (GradScaler's MPS kernels); before, an
    fp16 run there would train unscaled, so bf16 is used instead."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 8)


def amp_dtype(device, amp):
    """The one mixed-precision rule, for training, evaluation and the benchmark: None
    without --amp; fp16 on CUDA, and on MPS where this torch scales fp16 losses there (else
    bf16); bf16 on a CPU (fp16 there is slow and overflows without loss scaling)."""
    if not amp:
        return None
    if device.type == "cpu" or (device.type == "mps" and not mps_grad_scaler_supported()):
        return torch.bfloat16
    return torch.float16


def grad_scaler(device, amp):
    """Loss scaling, on exactly when the forward runs in fp16 (``amp_dtype``)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)


def markdown_table(header, rows):
    """A Markdown table: ``header`` names the columns, each row is a list of cell strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def git_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


REPLACE_TRIES = 5


def atomic_write(path, write_fn):
    """Write a file through ``write_fn(tmp_path)`` then rename it over ``path``.

    A crash or a kill mid-write leaves the previous file intact, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        replace_with_retries(tmp, path)
    except UserError:
        raise  # the new content stays in tmp, which the message names
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def replace_with_retries(tmp, path):
    """``os.replace``, tried again on PermissionError: on Windows a file that another program
    holds open (OneDrive's sync, an antivirus, evaluate.py reading a checkpoint) cannot be
    replaced for a moment. If it stays locked, one line names the file that keeps the data."""
    for attempt in range(REPLACE_TRIES):
        try:
            return os.replace(tmp, path)
        except PermissionError as exc:
            if attempt == REPLACE_TRIES - 1:
                raise UserError(f"{path}: cannot be replaced, another program holds it open "
                                f"({reason(exc, 80)}); the new content is kept in {tmp}: close "
                                f"that program, then rename {tmp} to {path}") from None
            time.sleep(0.1 * 2 ** attempt)  # 0.1 s, then 0.2, 0.4, 0.8


def save_json(obj, path):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def torch_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------- interrupts

def stop_signals():
    """SIGINT and SIGTERM, and SIGBREAK where it exists: Windows' console sends it for
    Ctrl-Break and when its window is closed."""
    return (signal.SIGINT, signal.SIGTERM) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK")
                                              else ())


class StopRequest:
    """Turns SIGINT and SIGTERM into a request that the training loop honours between steps.

    Used as a context manager around the training loop. The first signal only sets
    ``signum``: the loop finishes its step, writes a checkpoint and exits. A second Ctrl-C
    aborts at once, as users expect when they press it twice.
    """

    def __init__(self, verbose=True):
        self.signum = None
        self.verbose = verbose
        self._previous = {}

    def __enter__(self):
        for sig in stop_signals():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name} received: finishing the current step, then "
                  "saving a checkpoint (Ctrl-C again aborts without saving)",
                  file=sys.stderr, flush=True)


def quiet_worker(worker_id):
    """DataLoader ``worker_init_fn``: leave Ctrl-C to the main process.

    A terminal's Ctrl-C reaches every process of the job. A worker that died of it would
    make the main process fail mid-step; the main process instead finishes the step, saves,
    and shuts its workers down itself. SIGTERM keeps its default: it is how the DataLoader
    (and multiprocessing at exit) ends its workers, so a worker must never ignore it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while it started (WorkerSafeLoader)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class WorkerSafeLoader(DataLoader):
    """A DataLoader whose worker processes a Ctrl-C cannot kill while they start.

    A terminal's Ctrl-C reaches every process of the job. A worker still starting (under
    spawn, the default on macOS and Windows, that takes seconds: it imports torch) would die
    of it before ``quiet_worker`` ignores it, and the main process would then fail with
    "DataLoader worker exited unexpectedly" instead of saving. So SIGINT is blocked in this
    thread while the workers are created: they inherit the block, and ``quiet_worker``
    ignores SIGINT before unblocking it. A Ctrl-C meanwhile stays pending, and reaches the
    main process's handler as soon as the workers are launched. (POSIX; Windows has no
    signal masks.)
    """

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# --------------------------------------------------------------------------- torchrun

class Distributed:
    """This process's place in a ``torchrun`` job: rank 0 of 1 when not launched by torchrun.

    ``from_env`` joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK);
    the helpers below are no-ops in a single process, so callers need no branches.
    """

    def __init__(self, rank=0, world_size=1, local_rank=0, device=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device  # where collectives' tensors live (NCCL needs CUDA tensors)

    @classmethod
    def from_env(cls, device_request):
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_request in ("auto", "cuda") or device_request.startswith("cuda")
        if use_cuda and torch.cuda.is_available():
            if torch.cuda.device_count() <= local_rank:
                raise UserError(f"torchrun started {world_size} processes on this node but it "
                                f"has {torch.cuda.device_count()} GPU(s); lower --nproc_per_node")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        elif device_request in ("auto", "cpu"):
            device, backend = torch.device("cpu"), "gloo"
        else:
            raise UserError(f"--device {device_request} is not available for a torchrun job "
                            "here; use --device cpu (gloo) or run on CUDA GPUs (nccl)")
        dist.init_process_group(backend)
        return cls(rank, world_size, local_rank, device)

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def any(self, *flags):
        """Each flag OR-ed over all processes: one small all-reduce, so every rank agrees."""
        if not self.enabled:
            return [bool(f) for f in flags]
        t = torch.tensor([float(bool(f)) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def sum(self, tensor):
        """``tensor`` summed over all processes (returned on its own device)."""
        if not self.enabled:
            return tensor
        t = tensor.to(self.device)
        dist.all_reduce(t)
        return t.to(tensor.device)

    def gather(self, obj):
        """Every process's ``obj``, as a list indexed by rank (on every rank)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module):
        """Copy rank 0's buffers (BatchNorm running statistics) to every process."""
        if self.enabled:
            for buf in module.buffers():
                dist.broadcast(buf, src=0)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled:
            if dist.is_initialized():
                dist.destroy_process_group()
