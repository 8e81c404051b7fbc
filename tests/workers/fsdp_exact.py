"""Run under torchrun: the sharded model's logits equal the unsharded model's, and weights are sharded.

Each rank first computes logits with the plain (unsharded) 4-bit + LoRA model, exactly as one process
would, then wraps it with shardtune's FSDP and computes them again on the same batch. Prints one JSON
line per rank into WORKDIR/rank<r>.json; the test compares.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from shardtune import modeling, parallel
from shardtune.config import Config, apply_overrides
from shardtune.distributed import barrier, init_distributed, teardown
from shardtune.tokenizer import build_tiny_tokenizer


def main(workdir: str, overrides: list[str]) -> None:
    cfg = apply_overrides(Config(), dict(o.split("=", 1) for o in overrides), "test")
    info = init_distributed("cpu")
    base = Path(workdir) / "base"
    if info.is_main and not base.exists():
        modeling.write_random_base(cfg, build_tiny_tokenizer(), base)
    barrier()
    model = modeling.add_lora(modeling.load_base(cfg, str(base), info.device, "sdpa"), cfg)
    # LoRA B starts at zero; give the adapters weight so that they take part in the comparison.
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    batch = torch.randint(0, 384, (3, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(batch)
    mask[1, 30:] = 0  # a padded row too
    with torch.no_grad():
        reference = model(input_ids=batch, attention_mask=mask).logits
    sharded = parallel.shard(model, cfg.parallel, cfg.param_dtype, info.device, info.world_size)
    report = parallel.sharding_report(sharded)
    # which LoRA rows does this rank hold? (to show the ranks hold different halves)
    lora = next(p for n, p in sharded.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        logits = sharded(input_ids=batch, attention_mask=mask).logits
    # and one training step still agrees across ranks (gradients are reduced, not left local)
    loss = sharded(input_ids=batch, attention_mask=mask, labels=batch).loss
    loss.backward()
    losses = [None] * info.world_size
    dist.all_gather_object(losses, loss.item())
    (Path(workdir) / f"rank{info.rank}.json").write_text(
        json.dumps(
            {
                "rank": info.rank,
                "world": info.world_size,
                "identical": bool(torch.equal(logits, reference)),
                "max_abs_diff": float((logits - reference).abs().max()),
                "local": report["local"],
                "total": report["total"],
                "lora_shard_sum": float(lora.detach().sum()),
                "lora_shard_numel": lora.numel(),
                "losses": losses,
            }
        )
    )
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
