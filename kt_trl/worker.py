"""The background thread engine calls run on when the calling thread has other work meanwhile.

One thread for the process: engine calls are serialised by the engine anyway (its runtime lock),
and the thread only waits in native code with the GIL released.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_pid: int | None = None


def submit(fn, /, *args, **kwargs) -> Future:
    """Run `fn(*args, **kwargs)` on the engine worker thread."""
    global _executor, _pid
    with _lock:
        if _executor is None or _pid != os.getpid():  # none yet, or forked: the parent's thread is gone
            _executor, _pid = ThreadPoolExecutor(1, thread_name_prefix="kt_trl-engine"), os.getpid()
        return _executor.submit(fn, *args, **kwargs)
