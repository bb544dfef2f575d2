"""The recipe schema: typed, strict, documented; one loader for every command.

A recipe is a YAML file with a top-level ``kind`` that picks its schema class from
``RECIPE_KINDS``. Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is
an error that names the key and the nearest valid names. ``key=value`` overrides from the command
line are merged into the raw YAML dict *before* validation and go through the same checks.

The sections shared by every command are ``model``, ``data``, ``train`` and ``output_dir``
(``BaseRecipe``). A command that needs more adds a section by subclassing, then registers the
class under its kind::

    from typing import Literal
    from pydantic import Field
    from flexigpt.shared.recipe import BaseRecipe, Section, register_recipe_kind

    class GrowSection(Section):
        n_new: int = Field(4, ge=1, description="Blocks to add.")

    class GrowRecipe(BaseRecipe):
        kind: Literal["grow"] = Field("grow", description="Recipe kind.")
        grow: GrowSection = Field(default_factory=GrowSection, description="Depth expansion.")

    register_recipe_kind("grow", GrowRecipe)

after which ``load_recipe("recipes/grow/x.yaml", ["grow.n_new=8"])`` returns a ``GrowRecipe``.
``describe_recipe(GrowRecipe)`` prints every field with its type, default and description.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from flexigpt.shared.files import write_text_atomic

# The subsets of SlimPajama (field meta.redpajama_set_name of every document).
SLIMPAJAMA_SUBSETS: tuple[str, ...] = (
    "RedPajamaCommonCrawl",
    "RedPajamaC4",
    "RedPajamaGithub",
    "RedPajamaBook",
    "RedPajamaArXiv",
    "RedPajamaWikipedia",
    "RedPajamaStackExchange",
)


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message names the key and what is allowed."""


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- model
class ModelSection(Section):
    """Which model to start from and how to load it."""

    source: str = Field(
        ...,
        description="Hugging Face hub id or local directory of the starting model; flexigpt compact "
        "directories (with plan.json) are accepted too.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub id or directory; null: use `source`.")
    plan: str | None = Field(
        None,
        description="Path of a plan.json applied to `source` before training (turns a plain model into a "
        "shared-block one); null: a compact source keeps its plan, a plain one gets the identity plan.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the weights are loaded in; auto: the dtype of the training precision."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="transformers attention kernel."
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Load local model directories whose weights are pickles (*.bin), which can run code; "
        "false: refuse them (convert to safetensors once instead).",
    )


# ---------------------------------------------------------------------------------------- text
class TextSection(Section):
    """How documents become tokens, for every stream of a run: training, evaluation, calibration, perplexity.

    Every document is tokenised without special tokens, then gets BOS before it and EOS after it
    as this section says; packed streams cut the result into windows. Null values follow the
    tokenizer, so one recipe gives the same text to every step that reads it.
    """

    bos: bool | None = Field(
        None,
        description="Put the tokenizer's BOS token before every document; null: what the tokenizer itself "
        "does when it encodes a text (its add_bos_token).",
    )
    eos_between_docs: bool | None = Field(
        None,
        description="Put the tokenizer's EOS token between documents (after each one in a stream); null: true "
        "when the tokenizer has an EOS token.",
    )


# ---------------------------------------------------------------------------------------- data
class StreamSection(Section):
    """Where a text stream comes from."""

    source: Literal["slimpajama", "files"] = Field(
        "slimpajama",
        description="slimpajama: stream `hub_id` from the Hugging Face hub; files: local files matched by `files`.",
    )
    hub_id: str = Field("cerebras/SlimPajama-627B", description="Hub dataset id used when source=slimpajama.")
    split: str = Field("train", description="Dataset split.")
    files: list[str] = Field(
        default_factory=list,
        description="Glob patterns of local files (source=files): *.jsonl, *.jsonl.zst, *.json.gz, *.parquet or "
        "*.txt, all of one format. Relative paths are resolved against the working directory.",
    )
    format: Literal["auto", "jsonl", "parquet", "txt"] = Field(
        "auto", description="Format of `files`; auto: from the file extension."
    )
    subsets: list[str] | None = Field(
        None,
        description="Keep only documents whose meta.redpajama_set_name is one of these; null: keep all. "
        f"SlimPajama's subsets: {', '.join(SLIMPAJAMA_SUBSETS)}.",
    )
    text_field: str = Field("text", description="Column holding the document text (jsonl / parquet).")
    txt_sample_by: Literal["line", "paragraph", "document"] = Field(
        "paragraph", description="How .txt files split into documents."
    )

    @model_validator(mode="after")
    def _check_source(self) -> StreamSection:
        if self.source == "files" and not self.files:
            raise ValueError("files: source=files needs at least one glob pattern")
        if self.source == "slimpajama":
            if self.files:
                raise ValueError("files: only allowed with source=files (source=slimpajama streams `hub_id`)")
            for s in self.subsets or ():
                if s not in SLIMPAJAMA_SUBSETS:
                    raise ValueError(
                        f"subsets: unknown SlimPajama subset {s!r}; allowed: {list(SLIMPAJAMA_SUBSETS)}"
                    )
        if self.subsets is not None and not self.subsets:
            raise ValueError("subsets: an empty list keeps nothing; use null to keep every document")
        if self.format == "txt" and self.subsets:
            raise ValueError("subsets: .txt files carry no meta.redpajama_set_name to filter on")
        return self


class EvalDataSection(StreamSection):
    """The held-out stream: its first `batches` micro-batches per rank, unshuffled, every evaluation."""

    split: str = Field("validation", description="Dataset split.")
    batches: int = Field(16, ge=1, description="Micro-batches per rank in one evaluation.")


class DataSection(StreamSection):
    """The training stream: tokenised, packed into fixed-length sequences, shuffled, sharded."""

    seq_len: int = Field(
        2048, ge=8, description="Tokens per packed sequence (documents joined by the `text:` rule)."
    )
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="Packed sequences held in the seeded shuffle buffer of each rank; 0: no shuffle.",
    )
    seed: int = Field(0, description="Seed of the shuffle buffer (and of the per-epoch shard order).")
    num_workers: int = Field(
        0, ge=0, description="Tokenising worker processes per rank; 0: tokenise in the training process."
    )
    tokenize_batch: int = Field(
        64,
        ge=1,
        description="Documents per tokeniser call (part of the stream position: keep it fixed on resume).",
    )
    trace: bool = Field(
        False, description="Append a fingerprint of every consumed training batch to data_trace.rank*.jsonl."
    )
    eval: EvalDataSection | None = Field(
        None, description="Held-out stream for evaluation; null: no evaluation."
    )


# --------------------------------------------------------------------------------------- train
# Peak learning rate by trainable set when train.lr is null: adapters learn at the paper's 0.004,
# which is far too high for every weight of a trained model.
LR_DEFAULTS: dict[str, float] = {"adapters": 4e-3, "adapters+norms": 4e-3, "all": 2e-4}


class TrainSection(Section):
    """Optimisation, batch arithmetic, precision, logging and checkpointing."""

    trainable: Literal["adapters", "adapters+norms", "all"] = Field(
        "adapters+norms",
        description="What trains: adapters (LoRA factors), adapters+norms (plus output norms and slot-owned "
        "norms; the paper's reading), or all (every parameter, shared blocks included).",
    )
    trainable_layers: list[int] | None = Field(
        None,
        description="Restrict training to the parameters of these slots (model.layers indices), after the "
        "`trainable` rule; null: every slot. LLaMA-Pro trains only its inserted layers.",
    )
    trainable_head: bool = Field(
        False,
        description="With trainable_layers: also train the LM head and the final norm (reverse-order pruning "
        "recovers by tuning the last blocks and the head); with tied embeddings the head is the embedding.",
    )
    ds_config: str = Field(
        "ds_configs/zero2.json",
        description="DeepSpeed JSON config; relative paths are tried against the working directory, then the "
        "project root. Batch, clipping and precision fields may be 'auto' (filled from this section).",
    )
    micro_batch: int = Field(1, ge=1, description="Sequences per rank per forward pass.")
    grad_accum: int | None = Field(
        None,
        ge=1,
        description="Micro-batches accumulated per optimizer step; null: global_batch / (micro x world).",
    )
    global_batch: int | None = Field(
        None,
        ge=1,
        description="Sequences per optimizer step over all ranks; must equal micro x accum x world.",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate; null: the default of the trainable set, 4e-3 for adapters and "
        "adapters+norms (the paper's 0.004) and 2e-4 for all (full-parameter training at 4e-3 made a held-out "
        "12-layer model's perplexity worse, 82.5 -> 123.5 in 100 steps; 2e-4: 84.4). The resolved recipe "
        "shows the value and marks a default.",
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps from 0 to `lr`.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at lr x min_lr_ratio.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to 1-D parameters).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0: no clipping.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; set this or token_budget.")
    token_budget: int | None = Field(
        None,
        ge=1,
        description="Training tokens; steps = ceil(budget / (global_batch x seq_len)). Set this or max_steps.",
    )
    stop_at_step: int | None = Field(
        None,
        ge=1,
        description="Stop after this step with a checkpoint although the schedule runs to max_steps / "
        "token_budget (no final export); a later run resumes there. null, or a step at or past the end: run to the end.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU, bf16 on GPUs that support it, else fp16."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    shared_grad_in_gemm: bool = Field(
        False,
        description="With shared blocks trainable: add each extra slot's weight gradient inside its GEMM "
        "(addmm, beta = 1) instead of autograd's weight-sized add; docs/engine.md, 'Cost of sharing'.",
    )
    optimizer_impl: Literal["auto", "foreach", "fused"] = Field(
        "auto",
        description="Implementation of AdamW's update: fused (one fused kernel per parameter group, "
        "torch.optim.AdamW(fused=True); CUDA and CPU), foreach (multi-tensor ops), or auto (fused on GPUs, "
        "PyTorch's default elsewhere). The update is the same AdamW in each; docs/training.md, 'Speed options'.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder slot (regional compilation, before DeepSpeed wraps the "
        "model); state-dict names stay those of the eager model. Refused with ZeRO-3, gradient_checkpointing "
        "or shared_grad_in_gemm; docs/training.md, 'Speed options'.",
    )
    seed: int = Field(0, description="Seed of torch / numpy / random on every rank (offset by rank).")
    log_every: int = Field(10, ge=1, description="Steps between TensorBoard scalars.")
    eval_every: int = Field(
        0, ge=0, description="Steps between evaluations (needs data.eval); 0: only at the end."
    )
    checkpoint_every: int = Field(
        500, ge=1, description="Steps between checkpoints (one is also written at the end)."
    )
    keep_last: int = Field(
        3, ge=1, description="Checkpoints kept; older ones are deleted after a new one is complete."
    )
    checkpoint_checksums: bool = Field(
        True, description="Record a crc32 of every checkpoint file and check it on resume."
    )
    max_skipped_steps: int = Field(
        20,
        ge=0,
        description="fp16 only: consecutive steps DeepSpeed's loss scaler may skip for overflowing gradients "
        "before the run stops as diverged (bf16 / fp32 stop at the first non-finite loss or gradient).",
    )
    export: Literal["none", "compact", "compact+materialized"] = Field(
        "compact", description="Final model written to output_dir/final (and output_dir/final_materialized)."
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak TFLOP/s of one device for the MFU estimate; null: known GPUs only."
    )
    cpu_shm_comm: bool = Field(
        False,
        description="On CPU, use DeepSpeed's shared-memory allreduce (JIT-compiled, ~40 s on first use); "
        "false: plain gloo.",
    )
    dist_timeout_s: float | None = Field(
        1800.0,
        gt=0,
        description="Timeout of every collective of the process group, in seconds; null: DeepSpeed's "
        "default (10 minutes). Checkpoint writes wait for the slowest rank under it (a 7B model's "
        "optimizer state on a slow disk can take longer than 10 minutes). Rank 0's pruning, growing and "
        "final export are not collectives.",
    )
    rank0_wait_s: float = Field(
        86400.0,
        gt=0,
        description="How long the other ranks wait for rank 0 to prune, grow or export the model, in "
        "seconds (they wait outside the process group, so dist_timeout_s does not limit it).",
    )

    _lr_default: bool = PrivateAttr(False)

    @property
    def lr_is_default(self) -> bool:
        """Whether ``lr`` is the trainable set's default (``LR_DEFAULTS``) rather than the recipe's value."""
        return self._lr_default

    @model_validator(mode="after")
    def _check(self) -> TrainSection:
        if self.lr is None:
            # set in place: an assignment would validate the section again; the flag lives beside it
            self.__dict__["lr"] = LR_DEFAULTS[self.trainable]
            self._lr_default = True
        if (self.max_steps is None) == (self.token_budget is None):
            raise ValueError("max_steps / token_budget: set exactly one of them")
        if self.grad_accum is None and self.global_batch is None:
            raise ValueError(
                "grad_accum / global_batch: set at least one (the other is derived from the world size)"
            )
        if self.global_batch is not None and self.global_batch % (self.micro_batch * (self.grad_accum or 1)):
            raise ValueError(
                f"global_batch={self.global_batch} is not a multiple of micro_batch x grad_accum = "
                f"{self.micro_batch} x {self.grad_accum or 1}"
            )
        return self

    def resolve_batch(self, world_size: int) -> tuple[int, int, int]:
        """The (micro_batch, grad_accum, global_batch) for `world_size` ranks.

        Args:
            world_size: number of data-parallel ranks.

        Returns:
            micro batch per rank, accumulation steps, global batch; micro x accum x world = global.

        Raises:
            RecipeError: the recipe's numbers do not fit `world_size`.
        """
        m = self.micro_batch
        accum = self.grad_accum
        if accum is None:
            assert self.global_batch is not None
            if self.global_batch % (m * world_size):
                raise RecipeError(
                    f"train.global_batch={self.global_batch} is not divisible by train.micro_batch x world_size = "
                    f"{m} x {world_size}; set train.grad_accum or change the global batch"
                )
            accum = self.global_batch // (m * world_size)
        total = m * accum * world_size
        if self.global_batch is not None and total != self.global_batch:
            raise RecipeError(
                f"train.global_batch={self.global_batch} != train.micro_batch x train.grad_accum x world_size = "
                f"{m} x {accum} x {world_size} = {total}"
            )
        return m, accum, total

    def resolve_steps(self, global_batch: int, seq_len: int) -> int:
        """Optimizer steps of the run (max_steps, or the token budget rounded up to whole steps)."""
        if self.max_steps is not None:
            return self.max_steps
        assert self.token_budget is not None
        per_step = global_batch * seq_len
        return -(-self.token_budget // per_step)


# -------------------------------------------------------------------------------------- recipes
class BaseRecipe(Section):
    """Sections every command shares. Subclass it to add a section (see the module docstring)."""

    kind: str = Field(..., description="Recipe kind; picks the schema (see RECIPE_KINDS).")
    model: ModelSection = Field(..., description="Starting model.")
    data: DataSection = Field(default_factory=DataSection, description="Training (and evaluation) data.")
    train: TrainSection = Field(..., description="Optimisation, batch, precision, logging, checkpoints.")
    text: TextSection = Field(
        default_factory=TextSection,
        description="BOS / EOS rule of every text stream of the run (training, evaluation, calibration).",
    )
    output_dir: str = Field(
        ..., description="Run directory: checkpoints/, tb/, final/, recipe.yaml, plan.json."
    )

    @model_validator(mode="after")
    def _check_cross(self) -> BaseRecipe:
        if self.train.eval_every and self.data.eval is None:
            raise ValueError("train.eval_every > 0 needs a data.eval stream")
        return self

    def to_yaml(self) -> str:
        """The fully resolved recipe (defaults filled in) as YAML; a default learning rate says so."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if self.train is not None and self.train.lr_is_default:
            line = f"  lr: {yaml.safe_dump(self.train.lr).splitlines()[0]}\n"
            note = f"  # default for train.trainable={self.train.trainable}\n"
            text = text.replace(line, line[:-1] + note, 1)
        return text

    def save(self, path: str | Path) -> None:
        """Write the resolved recipe to `path` as YAML."""
        write_text_atomic(path, self.to_yaml())


class TrainRecipe(BaseRecipe):
    """Continued pre-training of a model (plain or shared-block) on a text stream."""

    kind: Literal["train"] = Field("train", description="Recipe kind.")


RECIPE_KINDS: dict[str, type[BaseRecipe]] = {"train": TrainRecipe}


def register_recipe_kind(name: str, cls: type[BaseRecipe]) -> type[BaseRecipe]:
    """Register the schema class of a recipe kind (``kind: name`` in YAML).

    Args:
        name: the value of the recipe's top-level ``kind`` key.
        cls: a subclass of BaseRecipe.

    Returns:
        `cls`, so this can be used as a decorator helper.

    Raises:
        RecipeError: `cls` is not a BaseRecipe or `name` is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, BaseRecipe)):
        raise RecipeError(f"register_recipe_kind({name!r}): {cls!r} is not a subclass of BaseRecipe")
    if RECIPE_KINDS.get(name, cls) is not cls:
        raise RecipeError(f"recipe kind {name!r} is already registered to {RECIPE_KINDS[name].__name__}")
    RECIPE_KINDS[name] = cls
    return cls


# --------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BaseRecipe:
    """Read a YAML recipe, apply dotted ``key=value`` overrides, validate it strictly.

    Args:
        path: the YAML file.
        overrides: ``a.b.c=value`` strings; values are parsed as YAML (``1e-4``, ``true``,
            ``[a, b]``, ``null``). An override may set a key the file leaves out.

    Returns:
        The validated recipe, an instance of the class registered for its ``kind``.

    Raises:
        RecipeError: unreadable file, unknown kind or key (with the nearest valid names), a bad value.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping, got {type(raw).__name__}")
    return recipe_from_dict(raw, overrides, where=str(path))


def recipe_from_dict(
    raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), where: str = "recipe"
) -> BaseRecipe:
    """Validate a raw recipe dict after applying overrides (see load_recipe)."""
    raw = _deepcopy(raw)
    parsed = [_parse_override(o) for o in overrides]
    # The kind decides the schema, so a `kind=` override goes first.
    for keys, value in parsed:
        if keys == ["kind"]:
            raw["kind"] = value
    cls = _kind_class(raw.get("kind"), where)
    for keys, value in parsed:
        _check_path(cls, keys)
        _set_path(raw, keys, value)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{where}: invalid recipe\n{format_validation_error(e, cls)}") from None


def _kind_class(kind: Any, where: str) -> type[BaseRecipe]:
    if kind is None:
        raise RecipeError(f"{where}: missing top-level key 'kind'; allowed: {sorted(RECIPE_KINDS)}")
    if kind not in RECIPE_KINDS:
        near = difflib.get_close_matches(str(kind), list(RECIPE_KINDS), n=3)
        hint = f" (did you mean {near}?)" if near else ""
        raise RecipeError(f"{where}: kind={kind!r} is unknown{hint}; allowed: {sorted(RECIPE_KINDS)}")
    return RECIPE_KINDS[kind]


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not of the form key.path=value")
    key, value = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise RecipeError(f"override {text!r}: empty key segment in {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: value is not valid YAML: {e}") from e
    return keys, parsed


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `X`, `X | None` or `Optional[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _map_values(annotation: Any) -> tuple[bool, type[BaseModel] | None]:
    """(whether `annotation` is a name -> value map such as ``dict[str, X]``, the section class of X)."""
    for a in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(a) is dict:
            args = typing.get_args(a)
            return True, _section_class(args[1]) if len(args) == 2 else None
    return False, None


def _check_path(cls: type[BaseModel], keys: list[str]) -> None:
    """Raise RecipeError if the dotted path does not exist in the schema.

    A key of a map (``tailor.variants.math``, ``compare.perplexity.wiki.context_len``) is any name
    the user chooses; past it, the map's value schema is checked again.
    """
    model: type[BaseModel] | None = cls
    i = 0
    while i < len(keys):
        k, dotted = keys[i], ".".join(keys[: i + 1])
        if model is None:
            raise RecipeError(f"override key {'.'.join(keys)!r}: {'.'.join(keys[:i])!r} has no sub-keys")
        fields = model.model_fields
        if k not in fields:
            raise RecipeError(_unknown_key_message(dotted, k, list(fields)))
        is_map, values = _map_values(fields[k].annotation)
        if is_map and i + 1 < len(keys):
            i += 1  # keys[i] names an entry of the map
            if values is None and i + 1 < len(keys):
                raise RecipeError(
                    f"override key {'.'.join(keys)!r}: {'.'.join(keys[: i + 1])!r} is a single value, no sub-keys"
                )
            model = values
        else:
            model = _section_class(fields[k].annotation)
        i += 1


def _unknown_key_message(dotted: str, key: str, allowed: list[str]) -> str:
    near = difflib.get_close_matches(key, allowed, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return f"unknown key {dotted!r}{hint} Allowed here: {sorted(allowed)}"


def _set_path(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def _deepcopy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def format_validation_error(err: ValidationError, cls: type[BaseModel]) -> str:
    """Readable lines for a pydantic error: dotted key, the problem, and for unknown keys the nearest names."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        dotted = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(cls, loc[:-1])
            allowed = list(parent.model_fields) if parent else []
            lines.append("  " + _unknown_key_message(dotted, loc[-1], allowed))
        else:
            got = e.get("input")
            lines.append(f"  {dotted}: {e['msg']}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return "\n".join(lines)


def _model_at(cls: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = cls
    for k in loc:
        if model is None or k not in model.model_fields:
            return None
        model = _section_class(model.model_fields[k].annotation)
    return model


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def describe_recipe(cls: type[BaseModel], prefix: str = "") -> str:
    """Every field of a recipe class as ``dotted.key (type, default): description`` lines."""
    lines = []
    for name, f in cls.model_fields.items():
        dotted = prefix + name
        sub = _section_class(f.annotation)
        ann = _type_name(f.annotation)
        if sub is not None:
            lines.append(f"{dotted}: {f.description or ''}")
            lines.append(describe_recipe(sub, dotted + "."))
            continue
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        lines.append(f"{dotted} ({ann}, default {default}): {f.description or ''}")
    return "\n".join(lines)
