"""``python -m calopc``: the same as the ``calopc`` command."""

from calopc.cli import main

raise SystemExit(main())
