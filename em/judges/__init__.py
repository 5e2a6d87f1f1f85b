"""``python -m em.judges compare RUN_DIR``: how much an eval's result depends on its judge (see
:mod:`em.eval.compare`)."""

from em.eval.compare import compare_records, compare_run, main

__all__ = ["compare_records", "compare_run", "main"]
