"""``python -m featstore.cli`` (and ``torchrun ... -m featstore.cli``): the ``featstore`` command."""

import sys

from featstore.cli import main

if __name__ == "__main__":
    sys.exit(main())
