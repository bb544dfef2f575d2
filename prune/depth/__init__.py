"""Depth pruning (recipe kind ``prune``): FlexiGPT and the ShortGPT baselines.

- ``importance``: block importance (Block Influence, angular distance, perplexity drop).
- ``selection``: base selection by the low-rank SVD distance (FlexiGPT eq. 2-5).
- ``replace``: replacement plans (SVD-initialised adapters, output norm, gamma calibration).
- ``steps`` / ``run``: the prune command's measuring steps and its run as library calls.
- ``build``: from a plan to a pruned model on disk; ``summary`` / ``plots``: what it reports.
- ``recipe``: the ``prune:`` recipe section.
"""
