"""Register the compact format with transformers' Auto classes when transformers loads them, not before.

``import flexigpt.shared`` must stay cheap (``--help`` and recipe errors load no torch), yet
``import flexigpt.shared`` followed by ``AutoModelForCausalLM.from_pretrained(compact_dir)`` must
load a compact checkpoint. ``install()`` bridges the two with a post-import hook:

- if transformers' Auto modules are already imported, it registers at once;
- otherwise it puts a finder on ``sys.meta_path`` that wraps the loaders of
  ``transformers.models.auto.configuration_auto`` and ``...modeling_auto``: right after either
  module has run, the matching class is registered (``autoclass.register_config`` /
  ``register_model``). Both modules are imported by any use of ``AutoConfig`` or
  ``AutoModelForCausalLM``, so registration always precedes the first load.

Registration at that point imports only transformers' configuration code (``autoclass``), which the
Auto modules have imported already, so it cannot meet a half-initialised module. Once both have
fired the finder answers every lookup with None at once (it stays in ``sys.meta_path``: removing a
finder while the import system iterates that list would make it skip the next one). Importing ``flexigpt.shared.engine.checkpoint`` (or calling
``register_auto_classes()``) registers directly, for code that wants no hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"


def _register_config(_: ModuleType | None = None) -> None:
    from flexigpt.shared.engine.autoclass import register_config

    register_config()


def _register_model(_: ModuleType | None = None) -> None:
    from flexigpt.shared.engine.autoclass import register_model

    register_model()


class _ThenLoader(importlib.abc.Loader):
    """Runs a module with its own loader, then calls a function on it; every other attribute is the loader's."""

    def __init__(self, loader: importlib.abc.Loader, then: Callable[[ModuleType], None]):
        self._loader = loader
        self._then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_data, resource readers, ...
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of each watched module the other finders find."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]):
        self.hooks = hooks

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        # the hook is dropped only once the module has run: importlib.util.find_spec alone (a
        # probe that imports nothing) must not use it up
        then = self.hooks.get(fullname)
        if then is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenLoader(spec.loader, lambda m, n=fullname: self._fire(n, m))
                return spec
        return None

    def _fire(self, name: str, module: ModuleType) -> None:
        then = self.hooks.pop(name, None)
        if then is None:
            return
        try:
            then(module)
        except Exception as e:  # never break the user's import of transformers over our registration
            warnings.warn(
                f"flexigpt: the compact format could not be registered with transformers' Auto classes ({e}); "
                "import flexigpt.shared.engine.checkpoint to register it directly",
                stacklevel=2,
            )


def install() -> None:
    """Register now where transformers' Auto modules are loaded, else when they are (idempotent)."""
    if any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    hooks: dict[str, Callable[[ModuleType], None]] = {}
    for name, register, attr in (
        (_CONFIG_MODULE, _register_config, "AutoConfig"),
        (_MODEL_MODULE, _register_model, "AutoModelForCausalLM"),
    ):
        module = sys.modules.get(name)
        if module is None:
            hooks[name] = register
        elif hasattr(module, attr):  # fully imported (a module still running lacks its classes)
            register(module)
    if hooks:
        sys.meta_path.insert(0, _AfterImport(hooks))
