"""The comparison command (recipe kind ``compare``): depth-pruning methods side by side, one report card.

- ``recipe``: the ``compare:`` section (methods, ratio, calibration, recovery, evaluation).
- ``run``: builds every method's model once (resuming finished ones), hands each to the trainer
  with the same recovery budget, and evaluates them.
- ``card``: what is measured per model (perplexity, zero-shot, sizes three ways, speed, memory)
  and the table, JSON and figure.
- ``cli``: ``flexigpt-prune`` runs recipes of kind ``compare`` through it.
"""
