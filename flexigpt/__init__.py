"""flexigpt: grow and prune LLMs with one shared-block engine.

Importing ``flexigpt.shared`` (which every command does) registers the compact checkpoint format
with the transformers Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads it
without ``trust_remote_code``.
"""

__version__ = "0.1.0"
