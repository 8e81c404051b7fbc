"""From rows to batches: split, tokenize, and a deterministic, resumable order of global batches.

The data position is a function of the optimizer step alone: step s of a run reads the same rows whatever
happened before (a restart, a resume onto a different number of processes), because the order is a
seeded permutation per epoch and a step always consumes one global batch of it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from shardtune.config import Config, DataConfig
from shardtune.data.formats import (
    IGNORE_INDEX,
    Encoded,
    RowFormatter,
    check_field_templates,
    detect_format,
    encode,
)
from shardtune.data.sources import Rows, folder_splits, has_named_splits, load_source, same_source
from shardtune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# A local folder's splits that hold its eval rows, in the order they are chosen (datasets' names)
EVAL_SPLITS = ("validation", "test")


@dataclass
class Data:
    """Tokenized train and eval splits, the formatter, and the eval rows (for generated samples)."""

    train: Encoded
    eval: Encoded
    formatter: RowFormatter
    eval_rows: list[dict]
    origin: str


def check_test_size(test_size: float) -> None:
    """data.test_size is a fraction below 1 or a whole count of rows; 1.5 rows is neither."""
    if test_size >= 1 and test_size != int(test_size):
        raise ConfigError(
            f"data.test_size={test_size}: a value of 1 or more is a count of held-out rows and must be whole; "
            f"use a fraction below 1 (e.g. 0.05) or a count (e.g. {int(test_size)})."
        )


def _split(rows: Rows, test_size: float, seed: int) -> tuple[Rows, Rows]:
    """Hold out `test_size` rows (a fraction or a count), chosen by a seeded shuffle."""
    n = len(rows.rows)
    n_eval = int(test_size) if test_size >= 1 else max(1, round(n * test_size))
    if n_eval >= n:
        raise DataError(f"{rows.origin}: data.test_size={test_size} leaves no training rows out of {n}.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])

    def pick(keep) -> Rows:
        idx = [i for i in range(n) if keep(i)]
        return Rows([rows.rows[i] for i in idx], [rows.numbers[i] for i in idx], rows.origin, rows.columns)

    return pick(lambda i: i not in held), pick(lambda i: i in held)


def _eval_is_training_data(cfg: DataConfig) -> bool:
    """Whether data.eval_source / data.eval_split would read the very rows the run trains on: a local file or
    the generated task has no named splits (eval_split cannot select other rows), or they name the training
    source and split themselves."""
    if cfg.eval_source is not None and not same_source(cfg.eval_source, cfg.source):
        return False
    return not has_named_splits(cfg.source) or (cfg.eval_split or cfg.split) == cfg.split


def own_eval_split(cfg: DataConfig) -> str | None:
    """The split a local dataset folder holds out for evaluation (validation, else test), where it has one
    and no eval data is named (data.eval_source, data.eval_split)."""
    if cfg.eval_source or cfg.eval_split:
        return None
    splits = folder_splits(cfg.source)
    return next((s for s in EVAL_SPLITS if s in splits and s != cfg.split), None)


def _train_and_eval(source: Rows, cfg: DataConfig, seed: int, pairs: bool) -> tuple[Rows, Rows]:
    """The training rows and the eval rows: another source or split where one is named, or the local folder's
    own validation or test split, else data.test_size rows held out of the source. Eval loss is never computed
    on rows the run trains on."""
    own = own_eval_split(cfg)
    if own is not None:
        log.info(
            "data: evaluating on the %r split of %s, its own held-out rows (data.eval_split=%s would hold out "
            "data.test_size of the training rows instead)",
            own,
            cfg.source,
            cfg.split,
        )
        return source, load_source(cfg.source, own, cfg, seed, pairs)
    if not (cfg.eval_source or cfg.eval_split):
        return _split(source, cfg.test_size, seed)
    if not _eval_is_training_data(cfg):
        held = load_source(cfg.eval_source or cfg.source, cfg.eval_split or cfg.split, cfg, seed, pairs)
        return source, held
    asked = ", ".join(
        f"data.{k}={v!r}" for k, v in (("eval_source", cfg.eval_source), ("eval_split", cfg.eval_split)) if v
    )
    why = (
        "it has no named splits"
        if not has_named_splits(cfg.source)
        else f"the training split is {cfg.split!r}"
    )
    log.info(
        "data: %s would evaluate on the training rows of %s (%s); holding out data.test_size=%s of them "
        "instead (data.eval_source=FILE evaluates on other rows)",
        asked,
        source.origin,
        why,
        cfg.test_size,
    )
    return _split(source, cfg.test_size, seed)


def build_data(cfg: DataConfig, tokenizer, seed: int, objective: str = "sft") -> Data:
    """Load, check, format and tokenize the training and eval rows. Fails fast with DataError. `objective`:
    objective.name (dpo and orpo train on preference rows, sft on any other format)."""
    # settings first: a bad one fails before a large dataset is read
    check_test_size(cfg.test_size)
    check_field_templates(cfg.fields)
    pairs = objective != "sft"
    source = load_source(cfg.source, cfg.split, cfg, seed, pairs)
    train, held = _train_and_eval(source, cfg, seed, pairs)
    fmt = cfg.format if cfg.format != "auto" else detect_format(source.columns, cfg.fields, source.origin)
    check_objective(fmt, objective, source)
    formatter = RowFormatter(
        fmt, tokenizer, source.origin, dict(cfg.fields), cfg.response_suffix, cfg.completion_only
    )
    formatter.check_fields()
    formatter.check_columns(source.columns)
    enc_train = encode(formatter, train.rows, cfg.max_len, cfg.append_eos, numbers=train.numbers)
    formatter_eval = (
        formatter
        if held.origin == source.origin
        else RowFormatter(
            fmt, tokenizer, held.origin, dict(cfg.fields), cfg.response_suffix, cfg.completion_only
        )
    )
    formatter_eval.check_columns(held.columns)
    enc_eval = encode(formatter_eval, held.rows, cfg.max_len, cfg.append_eos, numbers=held.numbers)
    if len(enc_train) == 0:
        empty = f" ({len(enc_train.empty)} have an empty response, e.g. {enc_train.empty_example})"
        raise DataError(
            f"{source.origin}: no training row has a response token left after truncation to "
            f"data.max_len={cfg.max_len}{empty if enc_train.empty else ''}."
        )
    left_out = set(enc_eval.empty)  # (the samples score eval rows against their responses)
    eval_rows = [r for i, r in enumerate(held.rows) if i not in left_out]
    return Data(enc_train, enc_eval, formatter_eval, eval_rows, source.origin)


def check_objective(fmt: str, objective: str, source: Rows) -> None:
    """Preference rows for dpo and orpo, and only for them."""
    if (fmt == "preference") == (objective != "sft"):
        return
    if fmt == "preference":
        raise DataError(
            f"{source.origin}: preference rows (chosen, rejected) train with objective.name=dpo or orpo; "
            f"objective.name=sft trains on one response per row (to train on the chosen ones, map them: "
            f"data.format=prompt_completion data.fields.completion='{{chosen}}')."
        )
    raise DataError(
        f"{source.origin}: objective.name={objective} trains on preference rows (columns chosen and rejected, "
        f"and prompt where they are text: data.format=preference), and these rows are format {fmt!r} "
        f"(columns: {', '.join(source.columns)}). Map columns with data.fields.chosen='{{column}}' etc."
    )


def collate(
    rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int, packed: bool = False
) -> dict[str, torch.Tensor]:
    """A batch of rows. `labels[t]` is the target for position t (already shifted): ids[t+1] where that token
    is trained, else -100; so the loss is a plain cross-entropy over all positions, and a row's last position
    never predicts the next row's first token.

    Padded (default): one row per sequence, right-padded, with an attention mask. Packed: the rows end to end
    in a single sequence with `position_ids` that restart at 0 for every row and no attention mask, from
    which transformers' attention (sdpa, flex, flash_attention_2) keeps every row to itself. `lengths` (row
    lengths, on the host) goes with either."""
    lengths = [len(ids) for ids, _ in rows]
    width, n_seq = (sum(lengths), 1) if packed else (max(lengths), len(rows))
    input_ids = torch.full((n_seq, width), pad_id, dtype=torch.long)
    labels = torch.full((n_seq, width), IGNORE_INDEX, dtype=torch.long)
    # where the rows are: position ids restarting at every row (packed), or the attention mask (padded)
    where = torch.zeros((n_seq, width), dtype=torch.long)
    start = 0
    for i, (ids, trained) in enumerate(rows):
        n = len(ids)
        seq, a = (0, start) if packed else (i, 0)
        t = torch.from_numpy(ids.astype(np.int64))
        input_ids[seq, a : a + n] = t
        where[seq, a : a + n] = torch.arange(n) if packed else 1
        labels[seq, a : a + n - 1] = torch.where(torch.from_numpy(trained[1:]), t[1:], IGNORE_INDEX)
        start += n
    key = "position_ids" if packed else "attention_mask"
    return {"input_ids": input_ids, "labels": labels, key: where, "lengths": torch.tensor(lengths)}


# a packed batch's row boundaries, by the names transformers' attention reads them under (flash attention and
# varlen.py's use them; SDPA and eager ignore them)
ROW_BOUNDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def row_bounds(lengths: torch.Tensor, device: torch.device) -> dict:
    """The model keywords that give attention a packed batch's rows (`lengths`, from `collate`): cumulative
    offsets (int32, on `device`) and the longest row (an int, so no kernel waits on the device for it)."""
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    longest = int(lengths.max())
    return dict(zip(ROW_BOUNDS, (offsets, offsets, longest, longest), strict=True))


class GlobalBatchSampler:
    """Which rows each process reads at each optimizer step.

    Each epoch is a permutation of the training rows seeded by (seed, epoch). Optimizer step s reads the
    s-th slice of `global_batch` rows of it, cut into micro-batches of `micro` rows; micro-batch j goes to
    process j % world. With `micro_tokens` (packed rows, their `lengths` given) the step's rows are cut into
    micro-batches of at most that many tokens instead (`token_micro_batches`). Either way the rows of a step,
    and so the update, do not depend on the number of processes.
    """

    def __init__(
        self,
        n_rows: int,
        global_batch: int,
        micro: int,
        world: int,
        rank: int,
        seed: int,
        lengths: np.ndarray | None = None,
        micro_tokens: int | None = None,
    ):
        if micro_tokens is None and global_batch % (micro * world):
            raise ConfigError(
                f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size={micro} x "
                f"{world} processes; change one of them."
            )
        if micro_tokens is not None and global_batch % world:
            raise ConfigError(
                f"train.global_batch_size={global_batch} is not a multiple of the {world} processes; change one "
                "of them."
            )
        self.steps_per_epoch = n_rows // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{n_rows} training rows are fewer than one global batch (train.global_batch_size={global_batch})."
            )
        self.n_rows, self.global_batch, self.micro = n_rows, global_batch, micro
        self.world, self.rank, self.seed = world, rank, seed
        self.lengths, self.micro_tokens = lengths, micro_tokens
        # micro-batches per process per step; with a token budget it varies from step to step
        self.grad_accum = None if micro_tokens else global_batch // (micro * world)
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            order = list(range(self.n_rows))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index of the step's first row in that epoch's order) for a 0-based step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch, k * self.global_batch

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (row indices) for optimizer step `step` (0-based)."""
        epoch, start = self.position(step)
        rows = self._epoch_order(epoch)[start : start + self.global_batch]
        if self.micro_tokens:
            return token_micro_batches(rows, self.lengths, self.micro_tokens, self.world)[self.rank]
        chunks = [rows[i : i + self.micro] for i in range(0, len(rows), self.micro)]
        return [c for j, c in enumerate(chunks) if j % self.world == self.rank]


def token_micro_batches(
    rows: list[int], lengths: np.ndarray, budget: int, world: int
) -> list[list[list[int]]]:
    """A step's rows cut into micro-batches of at most `budget` tokens, dealt to `world` processes: every
    process gets as many micro-batches as the others (FSDP runs collectives in each forward and backward) and
    about as many tokens. Rows stay whole and no longer than the budget (the config keeps it at least
    data.max_len); `len(rows)` is a multiple of `world`.

    The fewest micro-batches per process the tokens allow, k; the rows, longest first, each into the emptiest
    of the world x k micro-batches that has room (so they come out about equally full, not full and a remainder);
    if a row finds no room, one more per process and again (at k = rows / world every row has one alone). Then
    the micro-batches, fullest first, each to the process with the fewest tokens among those short of k. Ties
    break on row index and rank, so every process computes the same split."""
    sizes = {i: int(lengths[i]) for i in rows}
    order = sorted(rows, key=lambda i: (-sizes[i], i))
    k = max(1, -(-sum(sizes.values()) // (budget * world)))
    while True:
        bins: list[list[int]] = [[] for _ in range(world * k)]
        loads = [0] * (world * k)
        for i in order:
            b = min(range(len(bins)), key=lambda b: (loads[b], b))
            if loads[b] + sizes[i] > budget:
                break
            bins[b].append(i)
            loads[b] += sizes[i]
        else:
            break
        k += 1
    dealt: list[list[list[int]]] = [[] for _ in range(world)]
    tokens = [0] * world
    for b in sorted(range(len(bins)), key=lambda b: (-loads[b], b)):
        rank = min((r for r in range(world) if len(dealt[r]) < k), key=lambda r: (tokens[r], r))
        dealt[rank].append(bins[b])
        tokens[rank] += loads[b]
    return dealt


def padding_share(lengths: np.ndarray, global_batch: int, micro: int, seed: int) -> float:
    """Share of the tokens computed over the first epoch that are padding, when each micro-batch of the run's
    order is padded to its longest row (0 when the rows are fewer than one global batch)."""
    if len(lengths) < global_batch or micro < 1 or global_batch % micro:
        return 0.0
    sampler = GlobalBatchSampler(len(lengths), global_batch, micro, 1, 0, seed)
    real = computed = 0
    for step in range(sampler.steps_per_epoch):
        for rows in sampler.micro_batches(step):
            batch = lengths[rows]
            real += int(batch.sum())
            computed += len(rows) * int(batch.max())
    return 1 - real / computed


def padding_advice(lengths: np.ndarray, cfg: Config) -> str | None:
    """What padding costs this run, when it costs a quarter of the compute or more; None otherwise."""
    micro = cfg.train.micro_batch_size
    if cfg.data.packing or micro == 1:
        return None
    share = padding_share(lengths, cfg.train.global_batch_size, micro, cfg.train.seed)
    if share < 0.25:
        return None
    return (
        f"micro-batches of {micro} rows padded to their longest row: {share:.0%} of the tokens computed are "
        "padding; data.packing=true lays the rows end to end instead (same rows per step, same per-token loss, "
        "none of that compute)"
    )


def eval_batches(n_rows: int, batch: int, world: int, rank: int) -> list[list[int]]:
    """This process's eval batches; every process gets the same number (FSDP needs every rank in every
    forward), the last ones possibly empty."""
    per_round = batch * world
    rounds = -(-n_rows // per_round)
    out = []
    for k in range(rounds):
        start = k * per_round + rank * batch
        out.append(list(range(start, min(start + batch, n_rows))))
    return out


def log_data(data: Data, cfg: Config) -> None:
    """What the run will train on, in the log: rows, lengths, and what was truncated, dropped or left out."""
    lengths = data.train.lengths()
    log.info(
        "data: %s, format %s: %d train rows, %d eval rows; tokens per row mean %.0f, max %d",
        data.origin,
        data.formatter.fmt,
        len(data.train),
        len(data.eval),
        lengths.mean(),
        lengths.max(),
    )
    advice = padding_advice(lengths, cfg)
    if advice:
        log.warning("data: %s", advice)
    if data.train.truncated or data.train.dropped:
        log.warning(
            "data: %d rows truncated to data.max_len=%d; %d dropped (no response token left)",
            data.train.truncated,
            cfg.data.max_len,
            data.train.dropped,
        )
    if data.train.empty or data.eval.empty:
        log.warning(
            "data: %d training and %d eval rows left out: their response is empty%s (the first: %s)",
            len(data.train.empty),
            len(data.eval.empty),
            ", or chosen and rejected are the same" if data.train.group == 2 else "",
            data.train.empty_example or data.eval.empty_example,
        )
