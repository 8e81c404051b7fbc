"""Where host memory goes with FSDP CPU offload: resident memory after each phase of a step, and the loss.
    torchrun --nproc_per_node 2 bench/offload_probe.py [key=value ...] [--lean 0|1]
On one GPU FSDP is forced on (a run would train the plain module), so that one process shards into one
part and goes through FSDP's offload. `--lean 0` keeps FSDP's own host buffers (parallel/fsdp.py lean_offload off)."""

import json
import sys

import torch

from shardtune.config import Config, apply_overrides
from shardtune.model import loading, modeling
from shardtune.observability.memory import host_peak_gib, host_rss_gib
from shardtune.parallel import fsdp
from shardtune.parallel.distributed import init_distributed, teardown

cfg = apply_overrides(
    Config(),
    {
        "model.name_or_path": "llama3-70b",
        "model.shape.num_hidden_layers": "20",
        "parallel.mixed_precision": "bf16",
        "parallel.cpu_offload": "true",
        "parallel.activation_checkpointing": "true",
        "model.save_random_base": "false",
        **dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("--")),
    },
    "probe",
)
info = init_distributed("cuda")
lean = "--lean" not in sys.argv or sys.argv[sys.argv.index("--lean") + 1] == "1"
if not lean:
    fsdp.lean_offload = lambda model: None
backend = fsdp.FsdpBackend(cfg.parallel, cfg.param_dtype, info)
backend.enabled = True  # also on one GPU
marks = {"start": (host_rss_gib(), host_peak_gib())}
hf_config = modeling.model_config(cfg)
model, _ = loading.build_model(
    cfg,
    hf_config,
    None,
    "sdpa",
    backend,
    info.device,
)
marks["loaded"] = (host_rss_gib(), host_peak_gib())
batch = torch.randint(0, 384, (1, 2048), device=info.device)
with torch.no_grad():
    model(input_ids=batch)
marks["forward_no_grad"] = (host_rss_gib(), host_peak_gib())
torch.manual_seed(0)
loss = model(input_ids=batch, labels=batch).loss
marks["forward"] = (host_rss_gib(), host_peak_gib())
loss.backward()
marks["backward"] = (host_rss_gib(), host_peak_gib())
grads = [p.grad.double().norm() for p in model.parameters() if p.requires_grad and p.grad is not None]
grad_norm = torch.stack(grads).norm().item()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
opt.step()
marks["step"] = (host_rss_gib(), host_peak_gib())
torch.manual_seed(0)
loss2 = model(input_ids=batch, labels=batch).loss  # after the update: the offloaded path end to end
loss2.backward()
marks["step2"] = (host_rss_gib(), host_peak_gib())
if info.is_main:
    print(
        json.dumps(
            {
                "check": "offload-probe",
                "layers": hf_config.num_hidden_layers,
                "offload": cfg.parallel.cpu_offload,
                "lean": lean,
                "world": info.world_size,
                "loss": loss.item(),
                "grad_norm": grad_norm,
                "loss_after_step": loss2.item(),
                **{k: {"rss": round(v[0], 2), "peak": round(v[1], 2)} for k, v in marks.items()},
            }
        )
    )
teardown()
