"""Loaded first by every Python process of tests/test_workers.py's subprocess runs (the test
puts this folder on PYTHONPATH), to run train_kd.py as it runs on macOS and Windows.

- KD_SPAWN=1: DataLoader workers start with spawn, those platforms' default.
- KD_SYNC=DIR: a sync point for the Ctrl-C test, with no sleeps in the test. The main process
  writes to the FIFO DIR/workers_started once its first DataLoader has launched its workers
  (the test blocks reading it), then waits for DIR/sigint_sent; every
  spawned worker waits in its start-up (here, before torch is even imported) until the test
  has sent the Ctrl-C and written DIR/sigint_sent. So the Ctrl-C always reaches workers that
  are still starting, the moment where it used to kill them.
"""
import os
import sys
import time

_SYNC = os.environ.get("KD_SYNC")


def _wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.01)


if _SYNC and "--multiprocessing-fork" in sys.argv:  # a spawned worker, starting up
    _wait_for(os.path.join(_SYNC, "sigint_sent"))
elif (os.environ.get("KD_SPAWN") or _SYNC) and sys.argv[0].endswith(".py"):  # the script
    import multiprocessing

    multiprocessing.set_start_method("spawn", force=True)
    if _SYNC:
        from torch.utils.data import dataloader

        _init = dataloader._MultiProcessingDataLoaderIter.__init__

        def _init_then_signal(self, loader):
            _init(self, loader)
            if not os.path.exists(os.path.join(_SYNC, "sigint_sent")):  # the first loader
                with open(os.path.join(_SYNC, "workers_started"), "w") as fifo:
                    fifo.write("started")  # the test, blocked reading it, goes on
                _wait_for(os.path.join(_SYNC, "sigint_sent"))

        dataloader._MultiProcessingDataLoaderIter.__init__ = _init_then_signal
