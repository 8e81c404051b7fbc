"""Run under torchrun on GPUs: before any update, the sharded model's logits equal the unsharded model's.

Each rank builds the model twice from the same seeded random weights (bf16 compute, NF4 storage bf16, LoRA
r=16 on all linear layers): once unsharded on its own GPU (the 1-GPU model), once sharded across all ranks
by FSDP (or DeepSpeed ZeRO-3 with parallel.backend=deepspeed). Same batch, same logits expected. Prints one
JSON line from rank 0.
usage: torchrun --nproc_per_node 2 tests/workers/gpu_exact.py SHAPE [key=value ...]
"""

import json
import os
import sys

import torch

from shardtune.config import Config, apply_overrides
from shardtune.model import loading, modeling
from shardtune.parallel.distributed import DistInfo, exit_process, init_distributed, teardown
from shardtune.parallel.fsdp import FsdpBackend
from shardtune.train.build import run_backend


def main(shape: str, overrides: list[str]) -> None:
    cfg = apply_overrides(
        Config(),
        {
            "model.name_or_path": shape,
            "parallel.mixed_precision": "bf16",
            "model.save_random_base": "false",
            **dict(o.split("=", 1) for o in overrides),
        },
        "test",
    )
    info = init_distributed(os.environ.get("SHARDTUNE_DEVICE", "cuda"))
    hf_config = modeling.model_config(cfg)
    attn = modeling.attention_implementation("auto", info.device)
    batch = torch.randint(0, hf_config.vocab_size, (2, 512), generator=torch.Generator().manual_seed(1)).to(
        info.device
    )
    single, _ = loading.build_model(
        cfg,
        hf_config,
        None,
        attn,
        FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo.alone(info.device)),
        info.device,
    )
    with torch.no_grad():
        expected = single(input_ids=batch).logits.float()
    del single
    torch.cuda.empty_cache()
    backend = run_backend(cfg, info)
    sharded, report = loading.build_model(cfg, hf_config, None, attn, backend, info.device)
    # (ZeRO-3's partitioned model runs inside its engine, which wrap makes)
    sharded = backend.wrap(torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad]))
    with torch.no_grad():
        logits = sharded(input_ids=batch).logits.float()
    rel = float((logits - expected).norm() / expected.norm())
    share = backend.sharding_report()
    if info.is_main:
        print(
            json.dumps(
                {
                    "shape": shape,
                    "backend": cfg.parallel.backend,
                    "strategy": cfg.parallel.sharding_strategy,
                    "layers": hf_config.num_hidden_layers,
                    "world": info.world_size,
                    "attn": attn,
                    "identical": bool(torch.equal(logits, expected)),
                    "rel_l2": rel,
                    "rank0_holds": share["local"] / share["total"],
                    "load_s": report.load_s,
                    "params": report.total,
                    "device": torch.cuda.get_device_name(info.device)
                    if info.device.type == "cuda"
                    else "cpu",
                }
            ),
            flush=True,
        )
    teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    exit_process(None)  # not through finalization, where gloo's threads can abort a finished run
