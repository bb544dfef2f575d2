"""Pruning, one room per method family, run by one ``flexigpt-prune`` command.

- ``depth/``: FlexiGPT and the ShortGPT baselines (recipe kind ``prune``).
- ``tailor/``: GPTailor, layers cut and stitched across fine-tuned variants (recipe kind ``tailor``).
- ``cli``: the command, which picks the method from the recipe's ``kind``.

Importing this package registers the ``prune`` and ``tailor`` recipe kinds (``depth/recipe.py``,
``tailor/recipe.py``).
"""

from flexigpt.prune.depth import recipe as _recipe  # noqa: F401  (registers kind "prune" with the recipe loader)
from flexigpt.prune.tailor import recipe as _tailor_recipe  # noqa: F401  (registers kind "tailor")
