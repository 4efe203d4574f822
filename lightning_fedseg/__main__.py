"""``python -m lightning_fedseg`` is the ``lightning-fedseg`` command."""

import sys

from lightning_fedseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
