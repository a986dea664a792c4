"""``python -m calopc.cli``: the same as the ``calopc`` command."""

import sys

from calopc.cli import main

sys.exit(main())
