"""SECURITY.md names the test behind each guarantee: every named test file and test function exists (so the
document cannot drift from the suite)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_security_md_names_exists():
    text = (REPO / "SECURITY.md").read_text()
    refs = 0
    for row in text.splitlines():
        current = None
        for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", row):
            path, name = m.group(1), m.group(2)
            if path:
                current = REPO / path
                assert current.is_file(), path
                refs += 1
            if name:
                assert current is not None, f"{name}: no test file before it in: {row[:80]}"
                assert re.search(rf"^def {name}\(", current.read_text(), re.M), f"{current.name}::{name}"
                refs += 1
    assert refs >= 20, refs
