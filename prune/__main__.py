"""``python -m flexigpt.prune RECIPE.yaml [key=value ...]``: the ``flexigpt-prune`` command (see ``cli.py``)."""

import sys

from flexigpt.prune.cli import main

if __name__ == "__main__":
    sys.exit(main())
