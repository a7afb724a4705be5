"""``python -m reference_training`` — see :mod:`reference_training.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
