"""Typed configuration: one small pydantic model per component, overridable from the command line.

Each section owns a few fields and is handed only to the component it configures. Field docstrings
are the help text (`--help` prints them). The defaults are the embedded default run: a tiny random
Llama, 4-bit NF4 base + LoRA, trained on a generated task under FSDP on CPU.

Overrides are `section.field=value` strings. Unknown keys and bad values raise `ConfigError`, which
names the key, where the value came from and the closest valid key, before anything is loaded.
"""

from __future__ import annotations

import difflib
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Dataset sources that are files on disk, by extension; anything else that is not 'generated' is a hub name.
LOCAL_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: what is wrong, where it came from, how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    """The base model: which weights, which architecture, which attention kernel."""

    name_or_path: str = "tiny"
    """Hugging Face hub id or local checkpoint directory; or, with init=random, a built-in shape:
    'tiny' (the embedded default), 'llama3-8b', 'llama3-70b'."""
    init: Literal["pretrained", "random"] = "random"
    """'pretrained' loads the checkpoint's weights; 'random' builds the architecture with random weights
    (offline demos, tests, benchmarks)."""
    shape: dict[str, Any] = Field(default_factory=dict)
    """LlamaConfig fields that override the architecture, e.g. {num_hidden_layers: 20} (init=random only)."""
    save_random_base: bool | None = None
    """init=random: write the random base into the run directory, so that the adapter can be reloaded onto
    it. Default: for models under 2B parameters; larger ones are drawn directly on the devices."""
    tokenizer: str | None = None
    """Tokenizer hub id or directory. Default: the model's own; the tokenizer built in code for built-in shapes."""
    attn_implementation: Literal[
        "auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flex_attention"
    ] = "auto"
    """Attention kernel. 'auto' picks flash_attention_2 when flash_attn is importable on a GPU, else on a GPU
    sdpa_varlen (SDPA, but packed batches go to torch's own varlen Flash kernel, row by row), else sdpa."""
    fused_kernels: bool | Literal["auto"] = "auto"
    """Liger kernels: fused RMSNorm, SwiGLU, RoPE, and linear + cross-entropy that never materializes the logits
    (GPU, needs liger-kernel; Llama models). 'auto': on where they can run, off elsewhere (the log says which)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust the repository."""


class QuantConfig(Section):
    """How bitsandbytes quantizes the frozen base."""

    load_in_4bit: bool = True
    """Quantize the frozen base to 4 bits with bitsandbytes (QLoRA). False trains LoRA on an unquantized base."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type. NF4 is the QLoRA paper's normal-float format."""
    double_quant: bool = True
    """Quantize the per-block scales too (saves about 0.4 bits per parameter)."""
    storage_dtype: Literal["auto", "bfloat16", "float16", "float32", "uint8"] = "auto"
    """dtype of the tensor that holds the packed 4-bit weights. 'auto' uses the FSDP parameter dtype
    (parallel.mixed_precision), the only value FSDP can shard."""


class LoraSettings(Section):
    """The LoRA adapters (PEFT) that are trained."""

    r: int = Field(16, gt=0)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, e.g. [q_proj, v_proj]; 'all-linear' adapts every linear layer but the output head."""
    use_rslora: bool = False
    """Rank-stabilized LoRA scaling (alpha / sqrt(r))."""
    compute_dtype: Literal["auto", "float32"] = "auto"
    """dtype the adapters compute in. 'auto': the run's compute dtype (bf16 under parallel.mixed_precision=bf16,
    through autocast, as the Hugging Face Trainer does); their weights, gradients and optimizer state stay
    float32 either way. 'float32': PEFT's default, every adapter input cast up (measured slower on GPU)."""
    fused: bool | Literal["auto"] = "auto"
    """Add each adapter's update to the base output inside one matmul (addmm) instead of PEFT's copy, scale
    and sum (fused_lora.py; same adapters and files, the sum rounded once). 'auto': on, except under
    parallel.backend=deepspeed, which gathers a weight only when its own module runs."""


class GeneratedTaskConfig(Section):
    """The built-in instruction task: letter strings to sort (ascending or descending) or reverse."""

    rows: int = Field(6000, gt=0)
    """Number of generated rows (train + eval)."""
    tasks: list[Literal["sort", "sort_desc", "reverse"]] = Field(
        default_factory=lambda: ["sort", "sort_desc"]
    )
    """Which letter tasks to mix: 'sort' them a to z, 'sort_desc' z to a, 'reverse' them (learned more slowly)."""
    letters: str = "abcdefgh"
    """Alphabet the strings are drawn from."""
    min_len: int = Field(3, gt=0)
    """Shortest string."""
    max_len: int = Field(5, gt=0)
    """Longest string."""


class DataConfig(Section):
    """Rows, their format, tokenization and the held-out split."""

    source: str = "generated"
    """Where rows come from: 'generated' (the built-in letter tasks), a local .jsonl/.json/.parquet/.csv file,
    or a Hugging Face dataset name."""
    subset: str | None = None
    """Hub dataset configuration name, if the dataset has several."""
    split: str = "train"
    """Split to train on."""
    eval_source: str | None = None
    """Separate eval data (file or hub name). Default: hold out data.test_size of the training rows."""
    eval_split: str | None = None
    """Split of the source (or of eval_source) to evaluate on, e.g. 'test'. Default: hold out data.test_size."""
    test_size: float = Field(0.05, gt=0)
    """Held-out eval rows: a fraction (<1) or a count (>=1) of the training rows."""
    max_rows: int | None = Field(None, gt=0)
    """Use only the first N rows of the source (after filtering)."""
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = "auto"
    """Row format. 'auto' picks from the columns: messages -> chat; instruction+output -> alpaca;
    prompt+completion -> prompt_completion; text -> text."""
    fields: dict[str, str] = Field(default_factory=dict)
    """Templates that build a format's fields from the row's columns, e.g.
    {instruction: 'Describe {product}', output: '{description}'}. Unset fields use the same-named column."""
    keep_if_empty: list[str] = Field(default_factory=list)
    """Keep only rows whose listed columns are empty, e.g. [input] keeps alpaca rows without an input."""
    response_suffix: str = ""
    """Text appended to every response (before EOS), e.g. '\\n\\n### End'."""
    max_len: int = Field(512, gt=1)
    """Longest tokenized row; longer rows are truncated (the count is reported)."""
    completion_only: bool = True
    """Compute the loss on response tokens only (prompt tokens get label -100). Ignored for format=text."""
    append_eos: bool = True
    """Append the tokenizer's EOS token to every response (chat rows: the chat template decides)."""
    chat_template: str | None = None
    """Chat template for format=chat: a Jinja string or a built-in name ('human_assistant', 'llama3').
    Default: the tokenizer's own."""
    packing: bool = False
    """Padding-free batches: the rows of a micro-batch are laid end to end in one sequence whose position ids
    restart at every row, so that no compute goes to padding and rows cannot attend to each other (the
    attention kernel gets the row boundaries). The rows of each step, and the per-token loss, are unchanged."""
    pad_token: str | None = None
    """Token used for padding. Default: the tokenizer's pad token, else a reserved special token, else EOS."""
    generated: GeneratedTaskConfig = Field(default_factory=GeneratedTaskConfig)
    """The built-in generated task (data.source=generated)."""


class OptimConfig(Section):
    """AdamW and the learning-rate schedule."""

    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps."""


class TrainConfig(Section):
    """The loop: steps, batch sizes, logging, checkpoints, resume."""

    output_dir: str = "runs"
    """Directory that holds run directories."""
    run_name: str | None = None
    """Run directory name under output_dir. Default: the recipe's file name. resume=auto continues it."""
    seed: int = 0
    """Seed for the model init, LoRA init, data split, shuffling and dropout."""
    max_steps: int | None = Field(200, gt=0)
    """Optimizer steps to train. None: train for `epochs` over the data."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training rows when max_steps is None."""
    global_batch_size: int = Field(32, gt=0)
    """Rows per optimizer step across all processes (fixed when the number of processes changes)."""
    micro_batch_size: int = Field(16, gt=0)
    """Rows per forward pass per process. Gradient accumulation = global / (micro x processes)."""
    micro_batch_tokens: int | None = Field(None, gt=0)
    """With data.packing: size micro-batches in tokens instead of rows. Each step's rows (still
    global_batch_size of them) are cut into micro-batches of at most this many tokens, every process getting as
    many micro-batches and about as many tokens as the others; train.micro_batch_size is then unused. At least
    data.max_len (rows stay whole). Memory follows the budget, not the luck of the draw."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (None: no clipping)."""
    log_every: int = Field(10, gt=0)
    """Print a metrics line every N steps."""
    save_every: int = Field(100, ge=0)
    """Save a checkpoint every N steps (0: only at the end)."""
    save_every_minutes: float | None = Field(None, gt=0)
    """Also save when this many minutes have passed since the last save."""
    keep_last: int = Field(2, gt=0)
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    save_timeout_minutes: float = Field(120.0, gt=0)
    """How long ranks wait for each other around a checkpoint save or load (slow storage), separately from
    the training collectives' timeout (parallel.timeout_minutes)."""
    resume: str = "auto"
    """'auto' continues from the run's latest valid checkpoint if there is one; 'never' refuses to reuse a
    run directory that has checkpoints; or the path of a checkpoint to start from."""


class ParallelConfig(Section):
    """Devices and FSDP. `accelerate launch --config_file X.yaml` sets these from X.yaml."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: 'auto' uses the GPUs when CUDA is available, else the CPU (gloo)."""
    backend: Literal["fsdp", "deepspeed"] = "fsdp"
    """What shards the frozen 4-bit base: torch FSDP1, or DeepSpeed ZeRO-3 (accelerate: distributed_type
    DEEPSPEED, zero_stage 3; needs `pip install deepspeed`), which then also partitions the adapters, their
    gradients and AdamW state."""
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD", "auto"] = (
        "FULL_SHARD"
    )
    """FSDP sharding strategy (accelerate: fsdp_sharding_strategy); HYBRID_SHARD shards within each machine
    and replicates across machines. 'auto' (shardtune's own value) keeps the whole 4-bit base on every GPU
    (NO_SHARD: FSDP gathers nothing, only the adapters' gradients cross GPUs) where `shardtune plan` says it
    fits with no more recomputation than sharding it would need, else shards it (HYBRID_SHARD on several
    machines, FULL_SHARD on one); FULL_SHARD on a CPU, with CPU offload and under DeepSpeed."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Compute and FSDP parameter dtype (accelerate: mixed_precision). 'no' is float32. The 4-bit storage
    dtype follows it; LoRA weights and optimizer state stay float32."""
    wrap_class: str = "LlamaDecoderLayer"
    """Decoder-layer class that FSDP wraps as one unit (accelerate: fsdp_transformer_layer_cls_to_wrap)."""
    activation_checkpointing: bool | Literal["auto", "selective"] = False
    """Recompute decoder layers in backward instead of storing their activations, applied through FSDP
    (accelerate: fsdp_activation_checkpointing). 'selective' recomputes no layer whole, only what is cheap to
    redo: the LoRA dropout masks, drawn again in backward instead of kept with a dropped copy of each adapter's
    input (lora.fused; 30% less activation memory at 70B widths with dropout, ~3% more time); `true` does the
    same in the layers it does not recompute. On a GPU the fused layers' dropout kernel keeps no masks in any
    mode, so there 'selective' is the same as none. 'auto' picks, from the GPU's memory and `shardtune plan`'s
    estimate, the least recomputation that fits: none, or every checkpoint_every-th layer for the largest k
    that fits."""
    checkpoint_every: int = Field(1, ge=1)
    """With activation checkpointing, recompute every k-th decoder layer (1: all of them, 2: half, ...)."""
    cpu_offload: bool = False
    """Keep sharded parameters and gradients in CPU memory between uses (accelerate: fsdp_offload_params).
    GPU only."""
    backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"] = "BACKWARD_PRE"
    """When FSDP fetches the next layer's parameters in backward (accelerate: fsdp_backward_prefetch)."""
    forward_prefetch: bool = False
    """Fetch the next layer's parameters before the current forward finishes (accelerate: fsdp_forward_prefetch)."""
    limit_all_gathers: bool = True
    """Bound in-flight all-gathers so that memory stays predictable."""
    gpu_memory_limit_gib: float | None = Field(None, gt=0)
    """Cap each process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 24 to check that a run
    fits 24 GB GPUs on bigger ones."""
    launch_config: str | None = None
    """An accelerate config YAML to take FSDP settings from when not started by `accelerate launch`
    (e.g. under torchrun)."""
    timeout_minutes: float = Field(30.0, gt=0)
    """Collective timeout. Sized so that a slow checkpoint save cannot trip it."""


class EvalConfig(Section):
    """Held-out loss and generated samples."""

    every: int = Field(50, ge=0)
    """Evaluate every N steps (0: only before and after training)."""
    max_rows: int | None = Field(512, gt=0)
    """Evaluate on at most N held-out rows."""
    batch_size: int = Field(16, gt=0)
    """Eval rows per forward pass per process."""
    samples: int = Field(64, ge=0)
    """Held-out rows to generate completions for at the end (exact-match accuracy is reported)."""
    show: int = Field(6, ge=0)
    """Generated samples printed in the run log."""
    questions: list[str] = Field(default_factory=list)
    """Free-form instructions to answer after training (written to generations.jsonl)."""
    max_new_tokens: int = Field(24, gt=0)
    """Longest generated completion."""


class Config(Section):
    """A whole run. Recipes build one of these and change a few fields."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        param = PARAM_DTYPES[self.parallel.mixed_precision]
        storage = self.quant.storage_dtype
        if self.quant.load_in_4bit and storage not in ("auto", param):
            # NOTE: FSDP flattens every parameter of a wrapped unit into one FlatParameter of a single dtype.
            # bitsandbytes stores the packed 4-bit bytes inside a tensor of quant.storage_dtype; unless that
            # dtype is the FSDP parameter dtype, FSDP cannot flatten the decoder layer together with its
            # norms, and a mixed-precision cast would reinterpret the packed bytes as numbers.
            raise ValueError(
                f"quant.storage_dtype={storage} conflicts with parallel.mixed_precision="
                f"{self.parallel.mixed_precision} (FSDP parameter dtype {param}). FSDP shards the packed 4-bit "
                f"weights only when they are stored in the FSDP parameter dtype; set quant.storage_dtype=auto "
                f"(or {param})."
            )
        if self.quant.load_in_4bit and self.parallel.sharding_strategy == "SHARD_GRAD_OP":
            # NOTE: bitsandbytes re-wraps a Linear4bit's weight in its forward (to reattach the quantization
            # state FSDP's flattening dropped); FSDP1 only allows that when parameters are resharded after
            # forward, which SHARD_GRAD_OP skips ("does not support changing the parameters between forward
            # and backward").
            raise ValueError(
                "parallel.sharding_strategy=SHARD_GRAD_OP does not work with 4-bit bitsandbytes weights (they are "
                "re-wrapped in every forward); use FULL_SHARD, or HYBRID_SHARD across machines."
            )
        if self.parallel.backend == "deepspeed" and self.lora.fused is True:
            raise ValueError(
                "lora.fused=true does not work with parallel.backend=deepspeed (ZeRO-3 gathers lora_B's weight "
                "only when lora_B itself runs, and the fused update reads it directly); use lora.fused=auto."
            )
        if self.parallel.backend == "deepspeed" and self.parallel.mixed_precision == "fp16":
            raise ValueError(
                "parallel.mixed_precision=fp16 is not supported with parallel.backend=deepspeed (its loss scaling "
                "is not wired in); use bf16."
            )
        if self.data.generated.min_len > self.data.generated.max_len:
            raise ValueError("data.generated.min_len must be <= data.generated.max_len")
        tokens = self.train.micro_batch_tokens
        if tokens is not None and not self.data.packing:
            raise ValueError(
                f"train.micro_batch_tokens={tokens} needs data.packing=true (padded micro-batches are sized in "
                "rows: train.micro_batch_size)"
            )
        if tokens is not None and tokens < self.data.max_len:
            raise ValueError(
                f"train.micro_batch_tokens={tokens} is less than data.max_len={self.data.max_len}: a row that long "
                f"would not fit a micro-batch; set train.micro_batch_tokens >= {self.data.max_len}"
            )
        if tokens is not None and self.parallel.backend == "deepspeed":
            raise ValueError(
                "train.micro_batch_tokens does not work with parallel.backend=deepspeed (its engine counts a "
                "fixed number of micro-batches per step); use train.micro_batch_size"
            )
        if tokens is None and self.train.micro_batch_size > self.train.global_batch_size:
            raise ValueError(
                f"train.micro_batch_size={self.train.micro_batch_size} exceeds train.global_batch_size="
                f"{self.train.global_batch_size}"
            )
        if self.model.shape and self.model.init != "random":
            raise ValueError("model.shape changes the architecture and needs model.init=random")
        # (the names against the model's own layers: check_inputs and modeling.model_config, not here, where a
        # saved run's configuration is validated again by shardtune merge)
        problem = target_modules_problem(self.lora.target_modules, None)
        if problem:
            raise ValueError(problem)
        if self.model.init == "pretrained" and self.model.name_or_path in BUILTIN_SHAPE_NAMES:
            raise ValueError(
                f"model.name_or_path={self.model.name_or_path!r} is a built-in shape without weights; "
                f"use model.init=random, or give a hub id or checkpoint directory"
            )
        for key in ("source", "eval_source"):
            value = getattr(self.data, key)
            if value and Path(value).suffix in LOCAL_DATA_SUFFIXES and not Path(value).is_file():
                raise ValueError(f"data.{key}: no such file: {value}")
        return self

    # Derived settings: one source of truth for dtypes, read by the model and parallel components.
    @property
    def param_dtype(self) -> str:
        """FSDP parameter / compute dtype name."""
        return PARAM_DTYPES[self.parallel.mixed_precision]

    @property
    def storage_dtype(self) -> str:
        """dtype holding the packed 4-bit weights."""
        return self.param_dtype if self.quant.storage_dtype == "auto" else self.quant.storage_dtype


PARAM_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
BUILTIN_SHAPE_NAMES = ("tiny", "llama3-8b", "llama3-70b")
# The linear layers of a Llama decoder layer, by the names lora.target_modules gives PEFT, and the model types
# whose decoder layers have exactly these
LLAMA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_STYLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


# ------------------------------------------------------------------------------------ the model's names
def known_model_type(name_or_path: str) -> str | None:
    """The model type, where it is known without a download: the built-in shapes are Llama; a local directory
    says in its config.json. None otherwise (the run checks once it has read the model's config:
    modeling.model_config)."""
    if name_or_path in BUILTIN_SHAPE_NAMES:
        return "llama"
    config = Path(name_or_path).expanduser() / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
    return None


def target_modules_problem(targets: str | list[str], model_type: str | None) -> str | None:
    """Why lora.target_modules would not adapt what it names (None when it would). Without a model type, only
    what fails for any model; with a Llama-style one, names its decoder layers lack too."""
    valid = f"{', '.join(LLAMA_LINEAR_NAMES)}, or lora.target_modules=all-linear"
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
        if targets == "all-linear" or not all(n.isidentifier() for n in names):
            return None  # PEFT's own value, or a regular expression, which PEFT matches against whole paths
        # NOTE: PEFT reads a string as one regular expression over whole module paths: 'q_proj,v_proj' or 'q_proj'
        # match nothing
        return (
            f"lora.target_modules={targets!r} is one string (PEFT would read it as a regular expression of whole "
            f"module paths, which it matches nowhere); give a list of names: lora.target_modules=[{','.join(names)}]"
            f". Valid names: {valid}"
        )
    if not targets:
        return f"lora.target_modules is empty: nothing would be trained; give names from {valid}"
    if model_type not in LLAMA_STYLE_TYPES:
        return None
    # PEFT matches a name against the end of a module's path: 'self_attn.q_proj' is q_proj; lm_head is the head
    unknown, close = _unknown([t.rsplit(".", 1)[-1] for t in targets], (*LLAMA_LINEAR_NAMES, "lm_head"))
    if not unknown:
        return None
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"lora.target_modules: no linear layer of this {model_type} model is called "
        f"{' or '.join(repr(t) for t in unknown)}{hint}, so nothing would be adapted there. Valid names: {valid}"
    )


def _unknown(names, valid) -> tuple[list[str], list[str]]:
    """The names not among `valid`, and the closest valid name to each (where one is close)."""
    unknown = [n for n in names if n not in valid]
    return unknown, [c for n in unknown for c in difflib.get_close_matches(n, valid, n=1)]


@functools.cache
def _config_fields(model_type: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(every field the model type's transformers config takes, its own fields beyond every config's), or None
    for a model type transformers does not know."""
    import inspect

    from transformers import CONFIG_MAPPING, PretrainedConfig

    if model_type not in CONFIG_MAPPING:
        return None
    cls = CONFIG_MAPPING[model_type]
    common = set(inspect.signature(PretrainedConfig.__init__).parameters)
    own = [p for p in inspect.signature(cls.__init__).parameters if p not in common | {"self", "kwargs"}]
    # rope_theta and rope_scaling: older names transformers folds into rope_parameters
    every = {
        *common,
        *own,
        *cls().to_dict(),
        *getattr(cls, "attribute_map", {}),
        "rope_theta",
        "rope_scaling",
    }
    return tuple(sorted(every)), tuple(own)


def shape_keys_problem(shape: dict[str, Any], model_type: str | None) -> str | None:
    """Why model.shape names a field the architecture's config does not have (None when it does not)."""
    fields = _config_fields(model_type) if shape and model_type else None
    if fields is None:
        return None
    every, own = fields
    unknown, close = _unknown(shape, every)
    if not unknown:
        return None
    hint = f" Did you mean {', '.join(f'model.shape.{c}' for c in close)}?" if close else ""
    return (
        f"model.shape.{unknown[0]}"
        + "".join(f", model.shape.{k}" for k in unknown[1:])
        + f": not a field of the {model_type} model's config, so it would change nothing.{hint} Its fields: "
        + ", ".join(own)
    )


# --------------------------------------------------------------------------- inputs on this machine
def _looks_like_path(value: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else with a slash, or starting like a path, is a path."""
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or "\\" in value


def convert_to_safetensors_hint(directory: str | Path) -> str:
    return (
        f"convert it once with transformers (which reads .bin files with weights_only=True): python -c "
        f"\"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{directory}', dtype='auto')"
        f".save_pretrained('{directory}-safetensors')\", then set model.name_or_path={directory}-safetensors"
    )


def check_names(cfg: Config) -> None:
    """lora.target_modules and model.shape against the architecture, where its type is known without a
    download (a built-in shape, a local directory; modeling.model_config checks the rest once it has the
    model's config). Not among Config's own checks, which also run on a saved run's configuration (shardtune
    merge), where a run trained before these checks existed must still load."""
    model_type = known_model_type(cfg.model.name_or_path)
    problem = target_modules_problem(cfg.lora.target_modules, model_type) or shape_keys_problem(
        cfg.model.shape, model_type
    )
    if problem:
        raise ConfigError(problem)


def check_inputs(cfg: Config) -> None:
    """What the configuration names on this machine, checked before anything is loaded: a local model directory
    (and its safetensors weights, for model.init=pretrained), a local tokenizer, train.resume's checkpoint.
    Separate from Config's own checks, which also run on a saved run's configuration (shardtune merge, export),
    where these paths may since have moved."""
    check_names(cfg)
    m = cfg.model
    if m.name_or_path not in BUILTIN_SHAPE_NAMES:
        path = Path(m.name_or_path).expanduser()
        if _looks_like_path(m.name_or_path) and not path.is_dir():
            raise ConfigError(
                f"model.name_or_path={m.name_or_path}: no such directory. Give an existing checkpoint directory, "
                f"a hub id (org/name), or a built-in shape ({', '.join(BUILTIN_SHAPE_NAMES)}) with model.init=random."
            )
        if path.is_dir():
            have = sorted(p.name for p in path.iterdir())
            if "config.json" not in have:
                raise ConfigError(
                    f"model.name_or_path={m.name_or_path}: no config.json in this directory, so it is not a "
                    f"Hugging Face model directory (it has: {', '.join(have[:8]) or 'nothing'}). Point "
                    f"model.name_or_path at the directory that holds config.json."
                )
            if m.init == "pretrained" and not any(name in have for name in SAFETENSORS_FILES):
                found = [n for n in have if n.endswith((".bin", ".pt", ".pth", ".ckpt"))] or have
                raise ConfigError(
                    f"model.name_or_path={m.name_or_path}: no safetensors weights ({' or '.join(SAFETENSORS_FILES)}); "
                    f"found {', '.join(found[:5]) or 'nothing'}. shardtune loads safetensors only (it never unpickles "
                    f"weight files): " + convert_to_safetensors_hint(m.name_or_path)
                )
    if m.tokenizer and _looks_like_path(m.tokenizer) and not Path(m.tokenizer).expanduser().is_dir():
        raise ConfigError(
            f"model.tokenizer={m.tokenizer}: no such directory. Give an existing tokenizer directory or a hub id "
            f"(org/name), or leave model.tokenizer unset for the model's own."
        )
    resume = cfg.train.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        close = difflib.get_close_matches(resume, ["auto", "never"], n=1)
        hint = f" Did you mean train.resume={close[0]}?" if close else ""
        raise ConfigError(
            f"train.resume={resume}: not auto, never, or an existing checkpoint directory (no directory "
            f"{resume}).{hint} Values: auto (continue from the run's newest intact checkpoint), never (refuse a run "
            f"directory that has checkpoints), or the path of a checkpoint (runs/<run>/checkpoints/step-N)."
        )


# ----------------------------------------------------------------------------------------------- key paths
def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _section_type(annotation: Any) -> type[Section] | None:
    inner = _unwrap_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, Section) else None


def _is_dict(annotation: Any) -> bool:
    return typing.get_origin(_unwrap_optional(annotation)) is dict


def field_paths(model: type[Section] = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf key as 'section.field' -> its FieldInfo (sections are descended into)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        sub = _section_type(info.annotation)
        if sub is not None:
            out.update(field_paths(sub, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = info
    return out


def _resolve_key(key: str) -> tuple[Any, bool]:
    """(FieldInfo of the leaf, whether the key goes inside a dict field). Raises ConfigError if unknown."""
    paths = field_paths()
    if key in paths:
        return paths[key], False
    # keys inside dict-valued fields, e.g. model.shape.num_hidden_layers or data.fields.output
    for path, info in paths.items():
        if key.startswith(path + ".") and _is_dict(info.annotation):
            return info, True
    close = difflib.get_close_matches(key, list(paths), n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    section = key.split(".")[0]
    if section in Config.model_fields and not close:
        names = ", ".join(p.split(".", 1)[1] for p in paths if p.startswith(section + "."))
        hint = f" Valid keys in '{section}': {names}."
    raise ConfigError(f"Unknown config key {key!r}.{hint} (`--help` lists every key.)")


def _parse_value(raw: str, info: Any, inside_dict: bool) -> Any:
    """Turn a command-line string into a Python value, guided by the field's type.

    Plain strings stay strings (pydantic coerces '32' to int and '1e-4' to float itself); YAML is used only
    for values that can only be lists, mappings or null, so that 'no' or '{product}' stay text.
    """
    annotation = info.annotation
    if inside_dict:
        value_type = typing.get_args(_unwrap_optional(annotation))[1:] or (Any,)
        if value_type[0] is str:
            return raw
        try:  # free-form values (e.g. LlamaConfig fields): numbers, booleans, lists as YAML reads them
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
    if annotation is str:
        return raw
    text = raw.strip()
    if text.lower() in ("null", "none", "~"):
        return None
    if text[:1] in "[{(":
        try:
            return yaml.safe_load(text.replace("(", "[").replace(")", "]") if text[0] == "(" else text)
        except yaml.YAMLError as e:
            raise ConfigError(f"Could not parse {raw!r}: {e}") from None
    return raw


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['a.b=1', ...] -> {'a.b': '1'}; anything that is not key=value is an error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or " " in key:
            raise ConfigError(f"Expected key=value, got {item!r} (e.g. lora.r=32). `--help` lists every key.")
        out[key.strip()] = value
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """A new Config with `overrides` ({'lora.r': '32'}) applied and everything re-validated.

    `source` names where the values came from ('command line', 'accelerate config ...') for error messages.
    String values are parsed by field type; other values are taken as they are.
    """
    data = cfg.model_dump()
    for key, value in overrides.items():
        info, inside_dict = _resolve_key(key)
        if isinstance(value, str):
            value = _parse_value(value, info, inside_dict)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate(data, {k: source for k in overrides})


def validate(data: dict[str, Any], sources: dict[str, str] | None = None) -> Config:
    """Build a Config from plain data, turning pydantic's errors into ConfigError messages."""
    sources = sources or {}
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, data, sources)) from None


def _explain(error: ValidationError, data: dict[str, Any], sources: dict[str, str]) -> str:
    paths = field_paths()
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a cross-field check; its message names the fields already, not where they came from
            given = [
                f"{k} from {src}" for k, src in sources.items() if k in msg and src != "the command line"
            ]
            lines.append(msg + (f" ({'; '.join(given)})" if given else ""))
            continue
        key = next((p for p in paths if loc == p or loc.startswith(p + ".")), loc)
        given = data
        for part in key.split("."):
            given = given.get(part) if isinstance(given, dict) else None
        origin = f" (from {sources[key]})" if key in sources else ""
        doc = (paths[key].description or "").split("\n")[0] if key in paths else ""
        lines.append(f"{key}={given!r}{origin}: {msg}." + (f"\n    {key}: {doc}" if doc else ""))
    return "Invalid configuration:\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------------------------------- help
def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    if text:
        return text
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def format_help(cfg: Config) -> str:
    """Every key with its current value (the recipe's), type and documentation, grouped by section."""
    values = cfg.model_dump()
    lines = []
    current = None
    for key, info in field_paths().items():
        section = key.split(".")[0]
        if section != current:
            current = section
            doc = Config.model_fields[section].annotation.__doc__ or ""
            lines.append(f"\n{section}:" + (f"  {doc.strip().splitlines()[0]}" if doc.strip() else ""))
        value = values
        for part in key.split("."):
            value = value[part]
        lines.append(f"  {key}={value!r}   [{_type_name(info.annotation)}]")
        for doc_line in (info.description or "").splitlines():
            lines.append(f"      {doc_line.strip()}")
    return "\n".join(lines).lstrip("\n")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
