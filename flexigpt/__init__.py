"""flexigpt: grow and prune LLMs with one shared-block engine.

Importing ``flexigpt.shared`` (which every command does) makes sure the compact checkpoint format
is registered with the transformers Auto classes before they are first used, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads it without ``trust_remote_code``; the import
itself loads no torch.
"""

__version__ = "0.1.0"
