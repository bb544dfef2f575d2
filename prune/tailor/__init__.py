"""GPTailor (recipe kind ``tailor``): prune by cutting layers and stitching in fine-tuned variants' layers.

- ``stitch``: the stitch plan (kept positions, sources, merges), plain data in YAML / JSON.
- ``sources``: base and variants read block by block from safetensors; merges (mergekit) cached.
- ``build``: candidates built in memory into one preallocated plain model; export.
- ``space`` / ``search``: the search space, heuristic warm starts, the resumable Optuna study.
- ``objective``: 1 - accuracy on lm-eval tasks at a budget (``limit``).
- ``report`` / ``run``: the search report and the command's run.
- ``recipe``: the ``tailor:`` recipe section.
"""
