"""Small helpers shared by the entry scripts: devices, seeds, atomic files, user errors.

Nothing here knows about models or data; it sits at the bottom of the import graph.
"""
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

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


def run_cli(main, parser):
    """Parse the arguments, run ``main(args)``, turn a ``UserError`` into a one-line exit."""
    args = parser.parse_args()
    try:
        main(args)
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


def resolve_device(name):
    """Map ``auto|cuda|cuda:N|mps|cpu`` to a ``torch.device``, failing clearly if unavailable."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; "
                            "use --device cpu (or auto)")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps: Apple MPS is not available on this machine; "
                            "use --device cpu (or auto)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {name!r} is unknown; use auto, cuda, cuda:N, mps or cpu")


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


def atomic_write(path, write_fn, suffix=""):
    """Write a file through ``write_fn(tmp_path)`` then rename it over ``path``.

    A crash or a kill mid-write leaves the previous file intact, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj, path):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def torch_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
