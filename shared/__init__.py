"""Engine, data, training and evaluation shared by grow and prune.

Importing this package registers the compact checkpoint format with the transformers Auto classes
(``AutoModelForCausalLM.from_pretrained(dir)`` then loads it, without ``trust_remote_code``).
"""

from flexigpt.shared.engine.checkpoint import register_auto_classes

register_auto_classes()
