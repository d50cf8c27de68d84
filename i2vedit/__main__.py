"""``python -m i2vedit edit|demo|bench``; see ``i2vedit.cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
