"""``python -m em ...`` = the ``em`` console script."""

from em.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
