"""Pruning: block importance, base selection, replacement plans and the prune command.

Importing this package registers the ``prune`` recipe kind (``recipe.py``).
"""

from . import recipe as _recipe  # noqa: F401  (registers kind "prune" with the recipe loader)
