"""Export a PEFT adapter directory from a checkpoint, with every rank's shard gathered.

The adapter is read from the sharded checkpoint (DCP) into full tensors by one process, without a
process group, and saved by PEFT itself through a skeleton of the model built on the meta device (no
weights, any size). So the saved files are PEFT's own format and hold whole tensors, never one rank's
slice, and exporting never needs the GPUs or the base weights.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp


def adapter_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trainable weights stored in a checkpoint, as full (unsharded) CPU tensors."""
    reader = dcp.FileSystemReader(str(checkpoint))
    meta = reader.read_metadata().state_dict_metadata
    state = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.items()
        if key.startswith("model.") and hasattr(m, "size")
    }
    with warnings.catch_warnings():  # reading without a process group is the point here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key.removeprefix("model."): value for key, value in state.items()}


def find_checkpoint(run_or_checkpoint: Path) -> Path:
    """A checkpoint directory itself, or the newest intact checkpoint of a run directory."""
    from shardtune.checkpoint.store import MANIFEST, newest_intact, verify_checkpoint

    path = Path(run_or_checkpoint)
    if (path / MANIFEST).is_file():
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"{path}: {problem}")
        return path
    found = newest_intact(path / "checkpoints")
    if found is None:
        raise ValueError(f"{path}: no intact checkpoint found (expected a checkpoint or a run directory)")
    return found


def checkpoint_model_config(ckpt: Path):
    """The base model's architecture as recorded in a checkpoint (a transformers config)."""
    from transformers import AutoConfig

    hf_config = json.loads((ckpt / "model_config.json").read_text())
    return AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)


def check_output(out: Path, what: str, marker: str, *sources: Path) -> Path:
    """`out`, refused if writing it would destroy anything but an earlier output of the same command: it is
    replaced whole once the new one is complete, so it must not be (or hold) a source read from, and if it
    exists it must be such an output (it holds `marker`) or empty. Checked before any work."""
    out = Path(out)
    resolved = out.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise ValueError(
                f"{out}: the {what} would replace {source}, which it is made from; give a new directory"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a directory for the {what}")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ValueError(
            f"{out} exists and is not an earlier {what} (it has no {marker}), and writing the {what} there "
            f"would delete what it holds; give a new directory, or empty it first"
        )
    return out


def export_adapter(run_or_checkpoint: Path, out_dir: Path) -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors + tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ckpt = find_checkpoint(run_or_checkpoint)
    out_dir = check_output(out_dir, "adapter", "adapter_config.json", run_or_checkpoint, ckpt)
    model_conf = checkpoint_model_config(ckpt)
    peft_conf = LoraConfig.from_pretrained(str(ckpt))
    model_conf._name_or_path = peft_conf.base_model_name_or_path  # PEFT records the base's name from here
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*"
        )  # peft calling a renamed API
        skeleton = get_peft_model(AutoModelForCausalLM.from_config(model_conf), peft_conf)
    tensors = adapter_tensors(ckpt)
    expected = {n for n, p in skeleton.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"{ckpt}: adapter weights do not match the LoRA config (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    skeleton.save_pretrained(str(tmp), state_dict=tensors, safe_serialization=True)
    tokenizer_dir = ckpt.parent.parent / "tokenizer"
    if tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
    # Replace an earlier export only once the new one is complete.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
