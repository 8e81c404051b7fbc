"""Where host memory goes with FSDP CPU offload: resident memory after each phase of a step.
torchrun --nproc_per_node 2 bench/offload_probe.py [key=value ...]"""

import json
import sys

import torch

from shardtune import loading, modeling, parallel
from shardtune.config import Config, apply_overrides
from shardtune.distributed import init_distributed, teardown
from shardtune.metrics import host_peak_gib, host_rss_gib

cfg = apply_overrides(
    Config(),
    {
        "model.name_or_path": "llama3-70b",
        "model.shape.num_hidden_layers": "20",
        "parallel.mixed_precision": "bf16",
        "parallel.cpu_offload": "true",
        "parallel.activation_checkpointing": "true",
        "model.save_random_base": "false",
        **dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a),
    },
    "probe",
)
info = init_distributed("cuda")
marks = {"start": (host_rss_gib(), host_peak_gib())}
conf = modeling.model_config(cfg)
model, _ = loading.build_model(
    cfg,
    conf,
    None,
    "sdpa",
    parallel.Sharder(cfg.parallel, cfg.param_dtype, info.device, info.world_size),
    info.device,
)
marks["loaded"] = (host_rss_gib(), host_peak_gib())
batch = torch.randint(0, 384, (1, 2048), device=info.device)
with torch.no_grad():
    model(input_ids=batch)
marks["forward_no_grad"] = (host_rss_gib(), host_peak_gib())
loss = model(input_ids=batch, labels=batch).loss
marks["forward"] = (host_rss_gib(), host_peak_gib())
loss.backward()
marks["backward"] = (host_rss_gib(), host_peak_gib())
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
opt.step()
marks["step"] = (host_rss_gib(), host_peak_gib())
if info.is_main:
    print(
        json.dumps(
            {
                "check": "offload-probe",
                "layers": conf.num_hidden_layers,
                "offload": cfg.parallel.cpu_offload,
                **{k: {"rss": round(v[0], 2), "peak": round(v[1], 2)} for k, v in marks.items()},
            }
        )
    )
teardown()
