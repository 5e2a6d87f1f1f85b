"""Background threads at idle CPU priority, so they only use cycles the training loop leaves free."""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int | None) -> bool:
    """Raise the calling thread's nice value (19 = idle priority). Returns whether it was applied.

    On Linux the nice value is a per-thread attribute (see setpriority(2), NOTES): setting it on this
    thread's id leaves the training thread untouched, and the threads this one starts afterwards (e.g.
    the OpenMP workers of its own torch ops, the executor of its event loop) inherit it. Elsewhere, or
    with ``nice`` None/0, nothing changes. Lowering priority needs no privileges.
    """
    if not nice or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), int(nice)))
        return True
    except (OSError, ValueError, TypeError) as e:  # a sandbox without setpriority, a bad value: run as is
        log.debug("could not lower thread priority: %s", e)
        return False
