"""One-line answers for hub downloads that fail (``shared.hub``), on the errors transformers raises."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from transformers import AutoConfig

from flexigpt.shared.hub import hub_message, hub_reason, recipe_hub_message


def _raised(fn, *args) -> BaseException:
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value


def _wrapped(cls: type[BaseException]) -> OSError:
    """An OSError raised from an instance of `cls`, as transformers raises them."""
    cause = cls.__new__(cls)  # their constructors want an HTTP response; the type is what matters
    try:
        raise OSError("transformers' several-line advice") from cause
    except OSError as e:
        return e


def test_transformers_errors_are_told_apart():
    # conftest sets HF_HUB_OFFLINE=1: an id that is not cached cannot be fetched
    offline = _raised(AutoConfig.from_pretrained, "no-such-org/no-such-model")
    assert hub_reason(offline) == "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    bad_id = _raised(AutoConfig.from_pretrained, "no_such_dir/")
    assert hub_reason(bad_id) == "it is neither an existing local directory nor a valid hub id"
    assert "gated model" in hub_reason(_wrapped(GatedRepoError))
    assert "no such model on the hub" in hub_reason(_wrapped(RepositoryNotFoundError))
    assert hub_reason(OSError("disk full")) is None
    assert hub_message("model.source", "x", OSError("disk full")) is None


def test_messages_are_one_line_naming_the_key_and_the_way_out():
    e = _raised(AutoConfig.from_pretrained, "no-such-org/no-such-model")
    msg = hub_message("model.tokenizer", "no-such-org/no-such-model", e, "the tokenizer")
    assert "\n" not in msg
    assert msg.startswith("model.tokenizer='no-such-org/no-such-model': the tokenizer could not be fetched")
    assert msg.endswith("(model.tokenizer=/path/to/model)")
    recipe = {
        "model": {"source": "org/model", "tokenizer": None},
        "data": {
            "source": "slimpajama",
            "hub_id": "org/corpus",
            "eval": {"source": "files", "hub_id": "x/y"},
        },
    }
    msg = recipe_hub_message(recipe, e)
    assert "\n" not in msg
    # the hub ids the recipe uses, and not the one of a stream that reads local files
    assert "the recipe names model.source='org/model', data.hub_id='org/corpus':" in msg
