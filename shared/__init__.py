"""Engine, data, training and evaluation shared by grow and prune.

Importing this package loads no torch or transformers. It makes sure the compact checkpoint format
is registered with the transformers Auto classes before they are first used, so that
``AutoModelForCausalLM.from_pretrained(dir)`` loads a compact directory without
``trust_remote_code`` (``engine.autohook``: a post-import hook on transformers' Auto modules, or an
immediate registration when they are loaded already). ``import flexigpt.shared.engine.checkpoint``
or ``flexigpt.shared.engine.autoclass.register_auto_classes()`` registers directly.
"""

from flexigpt.shared.engine.autohook import install as _install_auto_hook

_install_auto_hook()
