"""Where rows come from: the generated task, local files (jsonl/json/parquet/csv), or a hub dataset.

Rows are read with `datasets`, then handed on as plain dicts. Errors name the file or dataset, the row
(1-based) and what to change. A failure to read that is not the data's fault (the hub or the network down, a
storage fault) is DataUnavailable instead: a restart may succeed, so the run does not record it as an error in
its input, and launchers that restart (torchrun --max-restarts, `shardtune submit`) retry it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shardtune.config import DataConfig
from shardtune.config.checks import LOCAL_DATA_SUFFIXES, data_file_problem
from shardtune.data.tasks import generate_rows
from shardtune.errors import DataError, DataUnavailable
from shardtune.model import hub


@dataclass
class Rows:
    """Rows of one split, their 1-based row numbers in the source, and a name of where they came from
    (both for error messages)."""

    rows: list[dict]
    numbers: list[int]
    origin: str
    columns: list[str]


def _jsonl_bad_line(path: Path) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object, described; None if all are."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                # (some of json's messages end in "at": "Invalid control character '\\t' at")
                return f"line {n}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
            if not isinstance(value, dict):
                return f"line {n}: expected a JSON object per line, got {type(value).__name__}"
    return None


def _has_no_rows(path: Path) -> bool:
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return len(lines) <= (1 if path.suffix == ".csv" else 0)  # a CSV header alone has no rows


def _root_cause(e: BaseException) -> str:
    """The message of the exception that started it all: `datasets` wraps the reader's error (pandas' names
    the CSV line) in one that says only "An error occurred while generating the dataset"."""
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e).strip() or type(e).__name__


def _load_local(path: Path):
    import datasets

    builder = LOCAL_DATA_SUFFIXES[path.suffix]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # pyarrow/datasets errors rarely say which line
        if reason := hub.outage(e):
            raise DataUnavailable(
                f"{path}: could not read it ({reason}), a fault of the storage, not of the file: {hub.RETRIED}."
            ) from e
        if path.suffix != ".parquet" and _has_no_rows(path):
            raise DataError(f"{path} is empty: no rows to train on.") from None
        detail = _jsonl_bad_line(path) if builder == "json" else None
        raise DataError(f"{path}: could not read as {path.suffix} ({detail or _root_cause(e)}).") from None


def _load_hub(name: str, subset: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as e:
        local = "" if Path(name).exists() else " (and no local folder has that name)"
        refused = hub.refusal(e)
        if not refused and (reason := hub.outage(e)):
            raise DataUnavailable(
                f"could not reach dataset {name!r} (split {split!r}) on the Hugging Face Hub{local}: {reason}. "
                f"A network or hub outage: {hub.RETRIED}. Where the machines have no network, download it "
                "where there is one (datasets caches it; then set HF_HUB_OFFLINE=1) or point data.source at a "
                "local .jsonl/.json/.parquet/.csv file."
            ) from e
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face Hub{local}: "
            f"{str(e).rstrip('.')}.{f' ({refused}.)' if refused else ''} Without hub access, point data.source "
            "at a local .jsonl/.json/.parquet/.csv file."
        ) from None


def has_named_splits(source: str) -> bool:
    """Whether `split` selects rows of this source: a hub dataset or a dataset folder has named splits; a
    single local file and the generated task are all one split, whatever split is asked for."""
    return source != "generated" and Path(source).suffix not in LOCAL_DATA_SUFFIXES


def folder_splits(source: str) -> list[str]:
    """The splits of a local dataset folder, named by `datasets`' own rules for its file names (train.jsonl,
    test.parquet, validation.csv, and their variants: dev, valid, eval, data/train-00000-of-00002...); [] for
    anything else (a file, a hub dataset, the generated task), or a folder it cannot tell."""
    if source == "generated" or not Path(source).is_dir():
        return []
    from datasets.data_files import get_data_patterns

    try:
        return [str(split) for split in get_data_patterns(source)]
    except Exception:  # no data files: load_source says so, with the fix
        return []


def same_source(a: str, b: str) -> bool:
    """Whether two data.source values name the same data (paths compared resolved)."""
    return a == b or (a != "generated" and b != "generated" and Path(a).resolve() == Path(b).resolve())


def load_source(source: str, split: str, cfg: DataConfig, seed: int, pairs: bool = False) -> Rows:
    """All rows of one source and split, after data.keep_if_empty and data.max_rows. `pairs`: the run trains on
    preference pairs (the generated task then gives them)."""
    if source == "generated":
        rows, origin = generate_rows(cfg.generated, seed, pairs), "generated task"
        columns = list(rows[0]) if rows else []
    else:
        path = Path(source)
        if path.suffix in LOCAL_DATA_SUFFIXES:
            problem = data_file_problem(path)
            if problem:
                raise DataError(problem)
            ds, origin = _load_local(path), str(path)
        else:
            ds, origin = _load_hub(source, cfg.subset, split), f"dataset {source!r} ({split})"
        columns = list(ds.column_names)
        rows = ds.to_list()
    if not rows:
        raise DataError(f"{origin} is empty: no rows to train on.")
    numbers = list(range(1, len(rows) + 1))
    for column in cfg.keep_if_empty:
        if column not in columns:
            raise DataError(
                f"{origin}: data.keep_if_empty names column {column!r}, which is not there "
                f"(columns: {', '.join(columns)}); set data.keep_if_empty=[] to keep every row, or name "
                f"columns of this data."
            )
    if cfg.keep_if_empty:
        kept = [
            i for i, r in enumerate(rows) if all(not str(r.get(c) or "").strip() for c in cfg.keep_if_empty)
        ]
        if not kept:
            raise DataError(
                f"{origin}: no row has empty {cfg.keep_if_empty}, so data.keep_if_empty keeps none; set "
                f"data.keep_if_empty=[] to keep every row."
            )
        rows, numbers = [rows[i] for i in kept], [numbers[i] for i in kept]
    if cfg.max_rows is not None:
        rows, numbers = rows[: cfg.max_rows], numbers[: cfg.max_rows]
    return Rows(rows, numbers, origin, columns)
