"""``python -m flexigpt.shared.train RECIPE.yaml [key=value ...]``: the ``flexigpt-train`` command (see ``cli.py``)."""

import sys

from flexigpt.shared.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
