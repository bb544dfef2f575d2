"""Pruning, one room per method family, run by one ``flexigpt-prune`` command.

- ``depth/``: FlexiGPT and the ShortGPT baselines (recipe kind ``prune``).
- ``surgeon/``: the LLM Surgeon and its baselines (recipe kind ``surgeon``).
- ``tailor/``: GPTailor, layers cut and stitched across fine-tuned variants (recipe kind ``tailor``).
- ``compare/``: depth-pruning methods side by side under one report card (recipe kind ``compare``).
- ``cli``: the command, which picks the method from the recipe's ``kind``.

Importing this package registers the ``prune``, ``surgeon``, ``tailor`` and ``compare`` recipe kinds (their
``recipe.py``; none of them imports torch).
"""

from flexigpt.prune.compare import recipe as _compare_recipe  # noqa: F401  (registers kind "compare")
from flexigpt.prune.depth import recipe as _recipe  # noqa: F401  (registers kind "prune" with the recipe loader)
from flexigpt.prune.surgeon import recipe as _surgeon_recipe  # noqa: F401  (registers kind "surgeon")
from flexigpt.prune.tailor import recipe as _tailor_recipe  # noqa: F401  (registers kind "tailor")
