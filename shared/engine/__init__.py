"""The shared-block engine: what a shared model is and how it is built, checked, stored and exported.

- ``plan``: the slot plan, pure data (no torch).
- ``layout``: what the engine knows about each architecture, declared once.
- ``adapters``: the per-slot modules (low-rank adapters on shared linears, the output feature norm).
- ``parts``: the meta skeleton that builders fill with top modules and layers; parameter roles by module type.
- ``apply``: apply a plan to a source model, verify it, count its parameters, materialise it.
- ``checkpoint``: the compact checkpoint format, its Auto-class registration, the plain export.
- ``card``: the README.md model card written into every compact checkpoint directory.
- ``load_options``: which ``from_pretrained`` options a compact load honours, and which it refuses.
- ``peft_export``: a base-plus-adapters model (ShortGPT+LoRA) as a plain base and a peft adapter.
- ``tiny``: small random models of every supported architecture, for tests and benchmarks.
"""
