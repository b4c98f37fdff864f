"""Where and how a script computes: the device (with a probe for an NVIDIA GPU that this
torch cannot use), CPU threads and DataLoader workers, the mixed-precision rule, device
synchronisation and the one timer (``timed``, and ``time_interleaved`` built on it), seeds,
parameter counts, and the process's place in a torchrun job (``Distributed``)."""
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError, ranged


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


def timed(fn, device, warmup=0):
    """(``fn()``, seconds) of one call timed between device synchronisations (CUDA and MPS
    run asynchronously), after ``warmup`` untimed calls that warm the kernels up. The one
    timer of the toolkit: evaluation, benchmark.py and compress.py time through it."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def time_interleaved(models, x, device, runs, warmup, amp_dtype=None):
    """{name: [seconds per call]} of ``models`` ({name: module}) on ``x``, under inference
    mode and ``amp_dtype``'s autocast: one call of each model per round, rounds repeated,
    so that load which shifts over time hits them alike.

    ``runs`` is one count for all, or {name: count}: a model with fewer runs sits out the
    last rounds (the slow teacher), the others stay interleaved.
    """
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                              enabled=amp_dtype is not None)
    runs = runs if isinstance(runs, dict) else {name: runs for name in models}
    times = {name: [] for name in models}
    with torch.inference_mode(), autocast:
        for model in models.values():
            timed(lambda: model(x), device, warmup)
        for r in range(max(runs.values())):
            for name, model in models.items():
                if r < runs[name]:
                    times[name].append(timed(lambda: model(x), device)[1])
    return times


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def device_name(device):
    """A human-readable name of the hardware behind ``device`` (for reports). On a CPU it
    names the vector instructions as well (``cpu_features``): two CPUs that differ in them
    run other kernels, so their float sums and int8 speeds differ."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (f"CPU ({cpu}, {cpu_features(flags)}, "
            f"{threads} thread{'' if threads == 1 else 's'})")


def cpu_features(flags):
    """PyTorch's kernel level on this CPU (AVX2, AVX512...) and, when /proc/cpuinfo's
    ``flags`` show them, the int8 instructions VNNI and AMX."""
    extra = [name for name, flag in (("VNNI", "avx512_vnni"), ("AMX", "amx_tile"))
             if flag in flags]
    return " ".join([torch.backends.cpu.get_cpu_capability(), *extra])


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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


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
        return self.any_of(torch.tensor([bool(f) for f in flags]))

    def any_of(self, flags):
        """``any`` of a boolean tensor, read back once (one host synchronisation)."""
        flags = flags.to(device=self.device or flags.device, dtype=torch.float32)
        if self.enabled:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [bool(v) for v in flags.tolist()]

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
