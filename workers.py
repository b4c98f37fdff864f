"""DataLoader worker processes that leave Ctrl-C to the main process: ``quiet_worker`` (the
workers' ``worker_init_fn``) and ``WorkerSafeLoader`` (the DataLoader that starts them with
SIGINT blocked). ``data.loader`` builds every training and evaluation loader on them."""
import signal

from torch.utils.data import DataLoader


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

