"""The typed configuration: one small pydantic model per component.

Each section owns a few fields and is handed only to the component it configures. Field docstrings
are the help text (`--help` prints them). The defaults are the embedded default run: a tiny random
Llama, 4-bit NF4 base + LoRA, trained on a generated task under FSDP on CPU. Settings that conflict are
refused by checks.py; overrides and help are overrides.py's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shardtune.config.checks import PARAM_DTYPES, checkpointing_value, cross_checks, tracker_names


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
    adapter: str | None = None
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, e.g. an earlier run's
    `adapter/`) to start the adapters from instead of PEFT's initialization: continued SFT, or DPO/ORPO after SFT.
    Its LoRA settings (lora.r, lora.alpha, lora.use_rslora, lora.target_modules) and its base model, where it
    records one, must be this run's. DPO's reference is then this adapter as it starts (objective.reference)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust the repository."""


class QuantConfig(Section):
    """How bitsandbytes quantizes the frozen base."""

    bits: Literal[4, 8, 16] = 4
    """Bits per weight of the frozen base's decoder layers: 4 is QLoRA (bitsandbytes NF4, or quant_type=fp4);
    8 is bitsandbytes' LLM.int8 (Linear8bitLt: int8 weights with a scale per row, as transformers'
    BitsAndBytesConfig(load_in_8bit=True) builds them; FSDP cannot shard them: with several processes every one
    holds the whole 8-bit base); 16 is plain LoRA on an unquantized base in the compute dtype
    (parallel.mixed_precision)."""
    load_in_4bit: bool | None = None
    """Deprecated alias of quant.bits: true is bits=4, false is bits=16 (read from older configurations)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type (bits=4). NF4 is the QLoRA paper's normal-float format."""
    double_quant: bool = True
    """Quantize the per-block scales too (bits=4; saves about 0.4 bits per parameter)."""
    storage_dtype: Literal["auto", "bfloat16", "float16", "float32", "uint8"] = "auto"
    """dtype of the tensor that holds the packed 4-bit weights (bits=4). 'auto' uses the FSDP parameter dtype
    (parallel.mixed_precision), the only value FSDP can shard."""

    @field_validator("bits", mode="before")
    @classmethod
    def _bits_from_text(cls, value: Any) -> Any:
        """'8' from a command line (pydantic matches a Literal of ints exactly)."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @model_validator(mode="after")
    def _alias(self) -> QuantConfig:
        """quant.load_in_4bit (the setting before quant.bits) given: bits from it, the alias cleared."""
        bits = 16 if self.load_in_4bit is False else 4
        # (4 is the default, which the alias overrides; one that disagrees with another value is left for
        # checks.py to refuse)
        if self.load_in_4bit is not None and self.bits in (4, bits):
            object.__setattr__(self, "bits", bits)
            object.__setattr__(self, "load_in_4bit", None)
        return self

    @property
    def quantized(self) -> bool:
        return self.bits != 16


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
    """Separate eval data (file or hub name). Default: a local folder's own validation or test split (its
    validation.jsonl, test.parquet, ...) where it has one, else data.test_size of the training rows."""
    eval_split: str | None = None
    """Split of the source (or of eval_source) to evaluate on, e.g. 'test'. Default: a local folder's own
    validation or test split, else hold out data.test_size (also when set to the training split)."""
    test_size: float = Field(0.05, gt=0)
    """Held-out eval rows: a fraction (<1) or a count (>=1) of the training rows."""
    max_rows: int | None = Field(None, gt=0)
    """Use only the first N rows of the source (after filtering)."""
    format: Literal["auto", "preference", "alpaca", "chat", "prompt_completion", "text"] = "auto"
    """Row format. 'auto' picks from the columns: chosen+rejected -> preference (for objective.name=dpo|orpo:
    a prompt and two responses, text or message lists); messages -> chat; instruction+output -> alpaca;
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
    """Compute the loss on response tokens only (prompt tokens get label -100). Ignored for format=text, and
    for preference rows, whose prompt never trains."""
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
    """The optimizer (AdamW: torch's, or bitsandbytes' 8-bit or paged one) and the learning-rate schedule."""

    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """'adamw': torch's AdamW. The others are bitsandbytes' AdamW, as the Hugging Face Trainer's optim names
    them: 'adamw_8bit' keeps the moments in 8 bits (blockwise; tensors under 4096 elements stay 32-bit);
    'paged_adamw_8bit' and 'paged_adamw_32bit' keep those of tensors over 1e5 elements in CUDA unified memory,
    paged out to the host when the GPU runs short (GPU only). Not with parallel.backend=deepspeed. A checkpoint resumes only with the
    optimizer that saved it."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"] = (
        "cosine"
    )
    """Learning-rate schedule after warmup, by the Hugging Face names: 'cosine' and 'linear' decay to 0 at the
    last step, 'constant_with_warmup' (or 'constant') holds optim.lr, 'cosine_with_min_lr' decays to
    optim.min_lr_rate x optim.lr."""
    min_lr_rate: float | None = Field(None, ge=0, lt=1)
    """scheduler=cosine_with_min_lr: the rate it ends at, as a fraction of optim.lr (e.g. 0.1). Ignored by the
    other schedules."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps."""


class TrainConfig(Section):
    """The loop: steps, batch sizes, logging, checkpoints, resume."""

    output_dir: str = "runs"
    """Directory that holds run directories."""
    run_name: str | None = None
    """Run directory name under output_dir: one directory name, not a path. Default: the recipe's file name.
    resume=auto continues it."""
    seed: int = 0
    """Seed for the model init, LoRA init, data split, shuffling and dropout."""
    max_steps: int | None = Field(200, gt=0)
    """Optimizer steps to train. None: train for `epochs` over the data."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training rows when max_steps is None."""
    global_batch_size: int = Field(32, gt=0)
    """Rows per optimizer step across all processes (fixed when the number of processes changes)."""
    micro_batch_size: Annotated[int, Field(gt=0)] | Literal["auto"] = 16
    """Rows per forward pass per process. Gradient accumulation = global / (micro x processes). 'auto': on a
    GPU, the one of 1, 2, 4 ... 32 rows (a divisor of each process's rows per step) whose planned step is the
    fastest that fits the GPU's memory (or parallel.gpu_memory_limit_gib), with the settings left to auto
    beside it (activation checkpointing, sharding), as `shardtune plan` plans it; on a CPU the largest."""
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
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers rank 0 logs to: any of tensorboard (event files in the run directory), mlflow
    (MLFLOW_TRACKING_URI's server or store), wandb (W&B; WANDB_MODE=offline keeps it local); [] or none: none.
    Each gets the config, every metrics.jsonl record, and at the end loss.png and the adapter; a resumed run
    continues the same tracker run (its id is kept in the run directory's trackers.json)."""
    mlflow_experiment: str | None = None
    """MLflow experiment the run is logged under. Default: MLFLOW_EXPERIMENT_NAME, else MLflow's default one."""
    wandb_project: str | None = None
    """W&B project. Default: WANDB_PROJECT, else 'shardtune'."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_list(cls, value: Any) -> list[str]:
        return tracker_names(value)


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
    activation_checkpointing: bool | str = False
    """What decoder layers do with the tensors they keep for backward (accelerate:
    fsdp_activation_checkpointing). `true` recomputes every checkpoint_every-th layer in backward instead of
    keeping its activations (through torch's wrapper, applied under FSDP). 'selective' recomputes no layer
    whole, only what is cheap to redo: the LoRA dropout masks, drawn again in backward instead of kept with a
    dropped copy of each adapter's input (lora.fused; 30% less activation memory at 70B widths with dropout,
    ~3% more time); `true` does the same in the layers it does not recompute. On a GPU the fused layers'
    dropout kernel keeps no masks in any mode, so there 'selective' is the same as none. 'offload' recomputes
    nothing: every checkpoint_every-th layer (but the topmost of them, which backward needs first) sends what
    it keeps for backward to pinned host memory while the next layers compute, and gets it back ahead of its
    backward (host memory: about 1.5x what it sends, per process). A pattern of k (keep), o (offload), r
    (recompute), repeated over the layers, mixes them: 'orr' offloads layers 0, 3, 6... and recomputes the
    others; 'okr' keeps every third layer's too (what the host link can hide, what memory can hold, and the
    rest recomputed). 'auto' picks, from the GPU's memory and
    `shardtune plan`'s estimate, the fastest of these that fits."""
    checkpoint_every: int = Field(1, ge=1)
    """With activation checkpointing (or offloading), recompute (offload) every k-th decoder layer (1: all of
    them, 2: half, ...). A pattern says itself which layers do what."""

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, value: Any) -> bool | str:
        return checkpointing_value(value)

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
    """Held-out rows to generate completions for, scored by eval.metric: by the base model (the adapters off)
    once at the start, and by the tuned model at evals (eval.samples_every) and at the end, side by side in
    generations.jsonl. 0: none."""
    samples_every: int = Field(1, ge=0)
    """Generate the eval.samples rows with the adapters at every k-th eval (1: at every eval; their score goes to
    metrics.jsonl). 0: only at the end. (Greedy: the training is the same either way.)"""
    metric: Literal["auto", "exact_match", "rouge_l", "none"] = "auto"
    """How the generated samples are scored against the held-out answers: 'exact_match' (the same text,
    surrounding whitespace aside), 'rouge_l' (ROUGE-L F1: the longest common word sequence, for free text),
    'none'. 'auto': exact match where every reference has at most 5 words, else ROUGE-L."""
    show: int = Field(6, ge=0)
    """Generated samples printed in the run log."""
    questions: list[str] = Field(default_factory=list)
    """Free-form instructions to answer before and after training (written to generations.jsonl)."""
    max_new_tokens: int = Field(24, gt=0)
    """Longest generated completion."""


class ObjectiveConfig(Section):
    """What a step minimizes: the token loss of instruction tuning, or a preference loss over pairs of responses
    (rows with `chosen` and `rejected`: data.format=preference)."""

    name: Literal["sft", "dpo", "orpo"] = "sft"
    """'sft': cross-entropy of the response tokens, averaged over them. 'dpo': Direct Preference Optimization
    (the sigmoid loss) against a frozen reference model (objective.reference; no second model in memory).
    'orpo': odds-ratio preference optimization, no reference (the chosen response's NLL plus beta times the
    log-odds-ratio term). dpo and orpo average over pairs and need preference rows."""
    beta: float = Field(0.1, gt=0)
    """dpo: the inverse temperature of the implicit reward beta * log(policy / reference) (higher: stay closer to
    the reference). orpo: the weight (lambda) of the odds-ratio term."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """dpo: the probability that a pair's preference is flipped (conservative DPO, cDPO): the loss is
    -(1-e) log sigmoid(beta D) - e log sigmoid(-beta D). TRL 1.16's sigmoid loss ignores its label_smoothing;
    this is the formula older TRL and the cDPO note use."""
    reference: Literal["auto", "base", "adapter"] = "auto"
    """dpo: the reference model. 'base': the frozen base with the adapters turned off. 'adapter': the adapters
    as model.adapter starts them, frozen (the SFT model DPO continues from), as TRL's DPOTrainer does for a
    model that already has an adapter: their starting values are swapped in for the reference's forward (a
    copy of this process's share of the adapters; no second model), without dropout. 'auto': 'adapter' where
    model.adapter is set, else 'base'."""

    @property
    def sequences(self) -> int:
        """Sequences per data row: 2 for a preference pair (both responses run in one micro-batch)."""
        return 1 if self.name == "sft" else 2

    def reference_model(self, starts_from_adapter: bool) -> str:
        """'base' or 'adapter' (objective.reference decided; `starts_from_adapter`: model.adapter is set)."""
        if self.reference != "auto":
            return self.reference
        return "adapter" if starts_from_adapter else "base"

    @property
    def reference_forward(self) -> bool:
        """Whether each micro-batch runs one more forward, without gradients (DPO's reference)."""
        return self.name == "dpo"

    nll_on_prompt: bool = False
    """orpo: false: the NLL term over the chosen response's tokens only (the paper's -log P(chosen | prompt));
    true: over the prompt's tokens too, as TRL's ORPOTrainer and the ORPO authors' code compute it. The
    log-odds term reads the responses only either way."""


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
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        cross_checks(self)
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
