"""Depth growth: expansion strategies (FlexiGPT Block / Sequential, LLaMA-Pro, stacking) and the grow command.

Importing this package registers the ``grow`` recipe kind (``recipe.py``).
"""

from . import recipe as _recipe  # noqa: F401  (registers kind "grow" with the recipe loader)
