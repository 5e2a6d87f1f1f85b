"""``python -m em ...`` = the ``em`` console script."""

from em.cli import main

raise SystemExit(main())
