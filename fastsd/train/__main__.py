"""``python -m fastsd.train``: see ``python -m fastsd.train --help``."""

import sys

from fastsd.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
