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


def test_none_or_zero_changes_nothing():
    seen = {}

    def worker():
        seen["applied"] = (lower_thread_priority(None), lower_thread_priority(0))
        seen["nice"] = _nice()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"applied": (False, False), "nice": _nice()}
