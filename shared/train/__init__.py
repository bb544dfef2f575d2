"""Training: streamed data, DeepSpeed configs, the trainer, its checkpoints, and export.

- ``data``: documents -> tokens -> packed sequences -> seeded shuffle -> micro-batches.
- ``ds_config``: DeepSpeed JSON configs, filled and checked from the recipe.
- ``components``: model, tokenizer, optimizer, schedule, FLOP count and process group of a run.
- ``trainer``: the DeepSpeed ZeRO training loop.
- ``state``: training checkpoints (atomic, verified, rotated) and resume.
- ``export``: a training checkpoint turned into a model without starting an engine.
- ``cli`` / ``__main__``: the ``flexigpt-train`` command (``python -m flexigpt.shared.train``).
"""
