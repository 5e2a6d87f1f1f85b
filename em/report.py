"""``python -m em.report <sweep_dir> [--out DIR]``: the cross-seed report of a sweep (see em.sweep.report)."""

from __future__ import annotations

from collections.abc import Sequence

from em.sweep.report import main as report_main


def main(argv: Sequence[str] | None = None) -> int:
    """Delegate to :func:`em.sweep.report.main`."""
    return report_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
