"""The recipe schema: strict loading, dotted overrides, errors that name keys, kinds registry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field

from flexigpt.shared.recipe import (
    RECIPE_KINDS,
    BaseRecipe,
    RecipeError,
    Section,
    TrainRecipe,
    describe_recipe,
    load_recipe,
    recipe_from_dict,
    register_recipe_kind,
)

BASE = {
    "kind": "train",
    "model": {"source": "some/model"},
    "data": {"source": "files", "files": ["data/*.jsonl"], "seq_len": 64},
    "train": {"max_steps": 10, "micro_batch": 2, "grad_accum": 4},
    "output_dir": "runs/x",
}


@pytest.fixture
def recipe_file(tmp_path: Path) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(BASE))
    return p


def test_load_fills_defaults_and_applies_typed_overrides(recipe_file: Path) -> None:
    r = load_recipe(
        recipe_file,
        [
            "train.lr=1e-4",
            "data.eval={source: files, files: [h.jsonl], batches: 3}",
            "train.betas=[0.9, 0.99]",
        ],
    )
    assert isinstance(r, TrainRecipe)
    assert r.train.lr == 1e-4 and r.train.betas == (0.9, 0.99)
    assert r.data.eval is not None and r.data.eval.batches == 3 and r.data.eval.split == "validation"
    assert r.train.trainable == "adapters+norms" and r.data.shuffle_buffer == 1000
    # the resolved YAML round-trips to the same recipe
    assert recipe_from_dict(yaml.safe_load(r.to_yaml())) == r


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "did you mean 'lr'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("data.sed=3", "did you mean 'seed'"),
        ("model.source.x=1", "has no sub-keys"),
        ("train.precision=bf32", "'auto', 'fp32', 'bf16' or 'fp16'"),
        ("data.seq_len=4", "data.seq_len"),
        ("kind=trian", "did you mean ['train']"),
        ("no_equals_sign", "key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(recipe_file: Path, override: str, needle: str) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file, [override])
    assert needle in str(e.value)


def test_unknown_key_in_file_lists_nearest_names() -> None:
    raw = {**BASE, "model": {"source": "m", "tokenzier": "t"}}
    with pytest.raises(RecipeError, match=r"unknown key 'model.tokenzier'; did you mean 'tokenizer'"):
        recipe_from_dict(raw)


@pytest.mark.parametrize(
    ("train", "needle"),
    [
        ({"max_steps": 1, "token_budget": 5, "grad_accum": 1}, "set exactly one"),
        ({"grad_accum": 1}, "set exactly one"),
        ({"max_steps": 1}, "grad_accum / global_batch"),
        ({"max_steps": 1, "micro_batch": 2, "grad_accum": 2, "global_batch": 6}, "not a multiple"),
    ],
)
def test_train_section_cross_checks(train: dict, needle: str) -> None:
    with pytest.raises(RecipeError, match=needle):
        recipe_from_dict({**BASE, "train": train})


def test_batch_arithmetic_against_world_size() -> None:
    r = recipe_from_dict({**BASE, "train": {"max_steps": 1, "micro_batch": 2, "global_batch": 48}})
    assert r.train.resolve_batch(4) == (2, 6, 48)
    with pytest.raises(RecipeError, match=r"global_batch=48 is not divisible by .* 2 x 5"):
        r.train.resolve_batch(5)
    r = recipe_from_dict(
        {**BASE, "train": {"max_steps": 1, "micro_batch": 2, "grad_accum": 3, "global_batch": 12}}
    )
    assert r.train.resolve_batch(2) == (2, 3, 12)
    with pytest.raises(RecipeError, match=r"global_batch=12 != .* 2 x 3 x 4 = 24"):
        r.train.resolve_batch(4)
    r = recipe_from_dict({**BASE, "train": {"token_budget": 1000, "micro_batch": 2, "grad_accum": 1}})
    assert r.train.resolve_steps(global_batch=4, seq_len=64) == 4  # ceil(1000 / 256)


def test_data_source_rules() -> None:
    with pytest.raises(RecipeError, match="source=files needs at least one"):
        recipe_from_dict({**BASE, "data": {"source": "files"}})
    with pytest.raises(RecipeError, match="unknown SlimPajama subset 'RedPajamaC5'"):
        recipe_from_dict({**BASE, "data": {"source": "slimpajama", "subsets": ["RedPajamaC5"]}})
    with pytest.raises(RecipeError, match="no meta.redpajama_set_name"):
        recipe_from_dict(
            {**BASE, "data": {"source": "files", "files": ["a.txt"], "format": "txt", "subsets": ["x"]}}
        )
    with pytest.raises(RecipeError, match="needs a data.eval stream"):
        recipe_from_dict({**BASE, "train": {**BASE["train"], "eval_every": 5}})


def test_register_a_recipe_kind_with_its_own_section() -> None:
    class ToySection(Section):
        n_new: int = Field(4, ge=1, description="Blocks to add.")

    class ToyRecipe(BaseRecipe):
        kind: Literal["toy"] = Field("toy", description="Recipe kind.")
        toy: ToySection = Field(default_factory=ToySection, description="Toy section.")

    try:
        register_recipe_kind("toy", ToyRecipe)
        r = recipe_from_dict({**BASE, "kind": "toy"}, ["toy.n_new=8"])
        assert isinstance(r, ToyRecipe) and r.toy.n_new == 8 and r.train.max_steps == 10
        with pytest.raises(RecipeError, match="did you mean 'n_new'"):
            recipe_from_dict({**BASE, "kind": "toy"}, ["toy.n_nwe=8"])
        with pytest.raises(RecipeError, match="already registered"):
            register_recipe_kind("train", ToyRecipe)
        with pytest.raises(RecipeError, match="not a subclass of BaseRecipe"):
            register_recipe_kind("bad", ToySection)  # type: ignore[arg-type]
        assert "toy.n_new (int, default 4): Blocks to add." in describe_recipe(ToyRecipe)
    finally:
        RECIPE_KINDS.pop("toy", None)


def test_every_field_is_documented() -> None:
    lines = describe_recipe(TrainRecipe).splitlines()
    assert len(lines) > 50
    undocumented = [ln for ln in lines if ln.rstrip().endswith(":")]
    assert not undocumented, undocumented


def test_learning_rate_default_follows_the_trainable_set(recipe_file: Path) -> None:
    for rule, want in (("adapters", 4e-3), ("adapters+norms", 4e-3), ("all", 2e-4)):
        r = load_recipe(recipe_file, [f"train.trainable={rule}"])
        assert (r.train.lr, r.train.lr_is_default) == (want, True)
        # the resolved recipe shows the value and says it is the default, and reads back the same
        assert f"lr: {want}  # default for train.trainable={rule}" in r.to_yaml()
        assert yaml.safe_load(r.to_yaml())["train"]["lr"] == want
    r = load_recipe(recipe_file, ["train.trainable=all", "train.lr=4e-3"])
    assert (r.train.lr, r.train.lr_is_default) == (4e-3, False) and "# default" not in r.to_yaml()


class _Entry(Section):
    context_len: int = Field(8, ge=2, description="A field of a map's value.")


class _MapSection(Section):
    names: dict[str, str] = Field(default_factory=dict, description="A name -> text map.")
    entries: dict[str, _Entry] = Field(default_factory=dict, description="A name -> section map.")


class _MapRecipe(BaseRecipe):
    kind: Literal["maps_test"] = Field("maps_test", description="Recipe kind.")
    maps: _MapSection = Field(default_factory=_MapSection, description="Maps.")


def test_overrides_reach_the_entries_of_a_map(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(RECIPE_KINDS, "maps_test", _MapRecipe)
    raw = {
        **BASE,
        "kind": "maps_test",
        "maps": {"names": {"a": "x"}, "entries": {"wiki": {"context_len": 16}}},
    }
    r = recipe_from_dict(raw, ["maps.names.b=y", "maps.entries.wiki.context_len=32", "maps.entries.new={}"])
    assert r.maps.names == {"a": "x", "b": "y"}
    assert r.maps.entries["wiki"].context_len == 32 and r.maps.entries["new"].context_len == 8
    with pytest.raises(
        RecipeError, match=r"unknown key 'maps.entries.wiki.context'; did you mean 'context_len'"
    ):
        recipe_from_dict(raw, ["maps.entries.wiki.context=4"])
    with pytest.raises(RecipeError, match=r"'maps.names.a' is a single value, no sub-keys"):
        recipe_from_dict(raw, ["maps.names.a.b=1"])
    with pytest.raises(RecipeError, match=r"maps.entries.wiki.context_len"):
        recipe_from_dict(raw, ["maps.entries.wiki.context_len=1"])
