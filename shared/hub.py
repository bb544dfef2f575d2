"""One-line answers for a model, config or tokenizer that could not be fetched from the Hugging Face hub.

transformers reports a missing network, an unknown repository or a gated model as an ``OSError``
raised from a ``huggingface_hub`` error, after a long traceback. The commands turn those into one
line that names the recipe key and says how to point it at a local directory instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

_LOCAL_ADVICE = "or set it to a local directory holding config.json, the weights and the tokenizer files"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def hub_reason(exc: BaseException) -> str | None:
    """Why the hub could not deliver, in a few words, if `exc` comes from a hub download; else None."""
    names = [type(e).__name__ for e in _chain(exc) if type(e).__module__.startswith("huggingface_hub")]
    if not names:
        return None
    if "GatedRepoError" in names:
        return "a gated model: accept its licence on huggingface.co and log in (hf auth login, or HF_TOKEN)"
    if "RepositoryNotFoundError" in names:
        return "no such model on the hub (or it is private: log in with hf auth login, or set HF_TOKEN)"
    if "HFValidationError" in names:
        return "it is neither an existing local directory nor a valid hub id"
    if "EntryNotFoundError" in names or "RemoteEntryNotFoundError" in names:
        return "the hub repository lacks a file it needs"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        return "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    return "the hub could not be reached and it is not in the local hub cache"


def hub_message(key: str, value: str, exc: BaseException, what: str = "the config") -> str | None:
    """The one-line error for `key`=`value` when `exc` is a hub download failure, else None.

    Args:
        key: the recipe key that named the hub id (``model.source``, ``model.tokenizer``...).
        value: its value.
        exc: the exception raised while loading it.
        what: what was being fetched (``the config``, ``the tokenizer``, ``the model``).
    """
    reason = hub_reason(exc)
    if reason is None:
        return None
    return (
        f"{key}={value!r}: {what} could not be fetched from the Hugging Face hub ({reason}); "
        f"fetch it once where the hub is reachable, {_LOCAL_ADVICE} ({key}=/path/to/model)"
    )


def _hub_ids(raw: object, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(key, value) of every recipe value that names a hub id: model source / tokenizer, stream hub ids."""
    if isinstance(raw, dict):
        if raw.get("source") == "files":  # a stream of local files: its hub_id is not used
            raw = {k: v for k, v in raw.items() if k != "hub_id"}
        for k, v in raw.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                yield from _hub_ids(v, key + ".")
            elif (
                isinstance(v, str)
                and (key in ("model.source", "model.tokenizer") or k == "hub_id")
                and not os.path.exists(v)
            ):
                yield key, v


def recipe_hub_message(recipe: dict[str, object], exc: BaseException) -> str | None:
    """The one-line error of a hub failure met somewhere in a run, naming the recipe's hub ids.

    Used where the failing load is not known (the trainer, a command's later steps).

    Args:
        recipe: the resolved recipe as a dict (``recipe.model_dump(mode="json")``).
        exc: the exception the run raised.
    """
    reason = hub_reason(exc)
    if reason is None:
        return None
    ids = ", ".join(f"{k}={v!r}" for k, v in _hub_ids(recipe)) or "no hub id in the recipe"
    return (
        f"a file could not be fetched from the Hugging Face hub ({reason}); the recipe names {ids}: fetch "
        "them once where the hub is reachable, or use local copies (model.source=/path/to/model with "
        "config.json, the weights and the tokenizer files; a stream's source=files with its files)"
    )
