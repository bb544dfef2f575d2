"""``python -m flexigpt.grow RECIPE.yaml [key=value ...]``: the ``flexigpt-grow`` command (see ``cli.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
