"""Entry point for ``python -m fusiontrain <command> [options]``."""

import sys

from fusiontrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
