"""Shared bits of the entry points: logging set-up and turning EMError into a clean exit."""

from __future__ import annotations

import functools
import logging
import os
import sys


def quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)


def friendly_errors(fn):
    """Print an ``EMError`` as its message (what is wrong, what to do) and exit 2, no stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from em.errors import EMError

        try:
            return fn(*args, **kwargs)
        except EMError as err:
            print(f"\nem: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
