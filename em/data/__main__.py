"""``python -m em.data``: see :mod:`em.data.cli`."""

from em.data.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
