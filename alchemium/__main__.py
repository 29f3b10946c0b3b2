"""``python -m alchemium``: the ``alchemium`` command line (see :mod:`alchemium.cli`)."""

import sys

from alchemium.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
