"""Writing results safely and stopping safely: atomic writes (a crash never leaves half a
file; Windows' locked files are retried), JSON and torch saves through them, and
``StopRequest``, which turns SIGINT/SIGTERM into a request the training loop honours
between steps."""
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from cli import UserError, one_line

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
                                f"({one_line(exc, 80)}); the new content is kept in {tmp}: close "
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
