"""The background judge's idle priority: per thread, inherited by the threads it starts, never the caller's."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from em.utils.priority import lower_thread_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_only_the_calling_thread_and_its_children_are_lowered():
    main_before = _nice()
    seen: dict[str, object] = {}

    def worker():
        seen["applied"] = lower_thread_priority(19)
        seen["worker"] = _nice()
        child = threading.Thread(target=lambda: seen.__setitem__("child", _nice()))
        child.start()
        child.join()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"applied": True, "worker": 19, "child": 19}
    assert _nice() == main_before  # the training thread keeps its priority


def test_none_or_zero_changes_nothing_and_priority_is_never_raised():
    seen = {}

    def worker():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)  # differs from the main thread's
        seen["applied"] = (lower_thread_priority(None), lower_thread_priority(0))
        seen["after_noop"] = _nice()
        lower_thread_priority(19)
        lower_thread_priority(10)  # a lower nice would *raise* priority: kept at 19
        seen["after_10"] = _nice()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"applied": (False, False), "after_noop": 5, "after_10": 19}


def test_bad_values_do_not_raise():
    seen = {}
    t = threading.Thread(target=lambda: seen.__setitem__("r", lower_thread_priority("high")))  # type: ignore[arg-type]
    t.start()
    t.join()
    assert seen == {"r": False}


def test_probe_callback_refuses_a_bad_worker_nice():
    from em.errors import ConfigError
    from em.probes.callback import MisalignmentProbe

    for bad in ("high", 25, -1, True):
        with pytest.raises(ConfigError, match="worker_nice"):
            MisalignmentProbe(worker_nice=bad)
    assert MisalignmentProbe(worker_nice=None).worker_nice is None
