"""``python -m em.models``: see :mod:`em.models.fetch` (``list``, ``fetch <name>``, ``path <name>``)."""

from em.models.fetch import main

if __name__ == "__main__":
    raise SystemExit(main())
