"""DeepSpeed ZeRO-3 with 4-bit weights on this machine's devices, even on one GPU: the model partitioned by
zero3.ZeroBackend (forced on, so one process goes through DeepSpeed's partition and gather too), its logits
against the unsharded build, one training step through the engine, and a checkpoint state written back.
    torchrun --nproc_per_node N bench/zero3_probe.py [key=value ...]      (deepspeed must be importable)
"""

import json
import sys

import torch

from shardtune.config import Config, apply_overrides
from shardtune.model import loading, modeling
from shardtune.parallel.distributed import DistInfo, init_distributed, teardown
from shardtune.parallel.fsdp import FsdpBackend
from shardtune.parallel.zero3 import ZeroBackend
from shardtune.train.objectives import token_loss_sum

cfg = apply_overrides(
    Config(),
    {
        "model.name_or_path": "llama3-8b",
        "model.shape.num_hidden_layers": "4",
        "parallel.mixed_precision": "bf16",
        "parallel.backend": "deepspeed",
        "model.save_random_base": "false",
        **dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a),
    },
    "probe",
)
info = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
hf_config = modeling.model_config(cfg)
attn = modeling.attention_implementation("auto", info.device)
batch = torch.randint(0, hf_config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1)).to(
    info.device
)
dtype = modeling.DTYPES[cfg.param_dtype]
autocast = torch.autocast(info.device.type, dtype=dtype)

plain, _ = loading.build_model(
    cfg,
    hf_config,
    None,
    attn,
    FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo.alone(info.device)),
    info.device,
)
with torch.no_grad(), autocast:
    expected = plain(input_ids=batch).logits.float()
del plain

backend = ZeroBackend(cfg.parallel, info, 1, 1.0)
if not backend.enabled:  # one process: partition anyway (into one part), to go through DeepSpeed's gather
    import deepspeed

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    backend.enabled = True
model, _ = loading.build_model(cfg, hf_config, None, attn, backend, info.device)
w = next(m for m in model.modules() if type(m).__name__ == "Linear4bit").weight
kept = {"class": type(w).__name__, "quant_state": getattr(w, "quant_state", None) is not None}
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
engine = backend.wrap(optimizer)
with torch.no_grad(), autocast:
    logits = engine(input_ids=batch).logits.float()
rel = float((logits - expected).norm() / expected.norm())
labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], dim=1)
with autocast:
    loss = token_loss_sum(engine, {"input_ids": batch, "labels": labels}) / labels.numel()
backend.backward(loss)
norm = float(backend.step())
msd, osd = backend.trainable_state()
with torch.no_grad(), autocast:
    before = engine(input_ids=batch).logits.float()
backend.load_trainable_state(msd, osd)
with torch.no_grad(), autocast:
    after = engine(input_ids=batch).logits.float()
if info.is_main:
    print(
        json.dumps(
            {
                "check": "zero3-probe",
                "world": info.world_size,
                "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
                "logits_identical": bool(torch.equal(logits, expected)),
                "logits_rel_l2": rel,
                "weight_after_partitioning": kept,
                "loss": float(loss),
                "grad_norm": norm,
                "adapters_saved": len(msd),
                "state_written_back_changes_logits": float((after - before).abs().max()),
                "step_in_state": float(next(iter(osd["state"].values()))["step"]),
            }
        ),
        flush=True,
    )
teardown()
