"""Evaluation: perplexity, zero-shot tasks through lm-evaluation-harness, and the report.

- ``perplexity``: sliding-window perplexity of a causal LM on a token stream.
- ``zeroshot``: multiple-choice tasks through lm-eval, scored as the paper scores them.
- ``report`` / ``plots``: the JSON, markdown and PNG report comparing named variants.
- ``cli``: the ``flexigpt-eval`` command.
"""
