"""Run under torchrun: shardtune's sharded model computes exactly what the unsharded model computes.

The reference is the model as transformers and PEFT load it in one process (`from_pretrained` with a
BitsAndBytesConfig, then `get_peft_model`). shardtune builds its model from the same checkpoint, layer by
layer, sharded as it goes. Both get the same nonzero adapter weights; their logits on a batch are
compared bit for bit, and the shards are measured. Writes WORKDIR/rank<r>.json; the test compares.
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import AutoModelForCausalLM

from shardtune.config import Config, apply_overrides
from shardtune.model import loading, modeling
from shardtune.model.tokenizer import build_tiny_tokenizer
from shardtune.parallel.distributed import barrier, exit_process, init_distributed, teardown
from shardtune.parallel.fsdp import FsdpBackend, reduce_adapter_grads


def reference_model(cfg, base, device):
    model = AutoModelForCausalLM.from_pretrained(
        base,
        quantization_config=modeling.quantization_config(cfg),
        dtype=torch.float32,
        device_map={"": device},
        attn_implementation="sdpa",
    )
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):  # same kernels as shardtune on this CPU
            m.support_avx512bf16_for_cpu = False
    # PEFT's own LoRA layers (no lora.fused): the reference is what transformers + PEFT compute, in training mode
    # as the model a run builds is (bitsandbytes' LLM.int8 multiplies a dequantized weight when training on a
    # CPU, int8 rows otherwise)
    return get_peft_model(
        model, modeling.lora_config(apply_overrides(cfg, {"lora.fused": False}, "reference"))
    ).train()


def main(workdir: str, overrides: list[str]) -> None:
    cfg = apply_overrides(Config(), dict(o.split("=", 1) for o in overrides), "test")
    info = init_distributed("cpu")
    base = Path(workdir) / "base"
    if info.is_main and not base.exists():
        modeling.write_random_base(cfg, build_tiny_tokenizer(), base)
    barrier()
    reference = reference_model(cfg, base, info.device)
    backend = FsdpBackend(cfg.parallel, cfg.param_dtype, info)
    sharded, _ = loading.build_model(cfg, modeling.model_config(cfg), str(base), "sdpa", backend, info.device)

    # LoRA B starts at zero; give both models the same nonzero adapters so that they take part.
    g = torch.Generator().manual_seed(0)
    values = {}
    for name, q in reference.named_parameters():
        if q.requires_grad:
            values[name] = torch.randn(q.shape, generator=g) * 0.05
            q.data.copy_(values[name])
    whole = (
        FSDP.summon_full_params(sharded, writeback=True)
        if isinstance(sharded, FSDP)
        else contextlib.nullcontext()
    )
    with whole, torch.no_grad():
        for name, p in sharded.named_parameters():
            if p.requires_grad:
                p.copy_(values[name.replace("_fsdp_wrapped_module.", "")])

    batch = torch.randint(0, 384, (3, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(batch)
    mask[1, 30:] = 0  # a padded row too
    with torch.no_grad():
        expected = reference(input_ids=batch, attention_mask=mask).logits
        logits = sharded(input_ids=batch, attention_mask=mask).logits
    report = backend.sharding_report()
    # the ranks this one shards the base with, and (HYBRID_SHARD) those it holds the same shard as
    groups = {"shard_group": None, "replica_group": None}
    if isinstance(sharded, FSDP):
        groups["shard_group"] = dist.get_process_group_ranks(sharded.process_group)
        if getattr(sharded, "_inter_node_pg", None) is not None:
            groups["replica_group"] = dist.get_process_group_ranks(sharded._inter_node_pg)
    # one training step: every rank computes the same batch here, so once the adapters' gradients are
    # summed over the ranks each must be exactly `world` times the unsharded model's
    loss = sharded(input_ids=batch, attention_mask=mask, labels=batch).loss
    loss.backward()
    reduce_adapter_grads(sharded, info.world_size)
    reference(input_ids=batch, attention_mask=mask, labels=batch).loss.backward()
    ref_grads = {n: q.grad for n, q in reference.named_parameters() if q.requires_grad}
    adapters = {
        n.replace("_fsdp_wrapped_module.", ""): p for n, p in sharded.named_parameters() if p.requires_grad
    }
    grads_reduced = adapters.keys() == ref_grads.keys() and all(
        torch.equal(p.grad, info.world_size * ref_grads[n]) for n, p in adapters.items()
    )
    losses = [None] * info.world_size
    dist.all_gather_object(losses, loss.item())
    (Path(workdir) / f"rank{info.rank}.json").write_text(
        json.dumps(
            {
                "rank": info.rank,
                "world": info.world_size,
                "identical": bool(torch.equal(logits, expected)),
                "max_abs_diff": float((logits - expected).abs().max()),
                "local": report["local"],
                **groups,
                "total": report["total"],
                "adapters_whole": all(
                    p.shape == reference.get_parameter(n).shape for n, p in adapters.items()
                ),
                "adapter_sum": float(sum(p.detach().double().sum() for p in adapters.values())),
                "grads_reduced": grads_reduced,
                "losses": losses,
                "int8_layers": sum(type(m).__name__ == "Linear8bitLt" for m in sharded.modules()),
            }
        )
    )
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    exit_process(None)  # not through finalization, where gloo's threads can abort a finished run
