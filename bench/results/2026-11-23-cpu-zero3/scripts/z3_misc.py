"""Misc checks: (1) torch.distributed already initialized by the trainer (gloo), no deepspeed.init_distributed;
(2) offload_optimizer/offload_param = cpu with a torch AdamW (zero_force_ds_cpu_optimizer)."""
import argparse, torch, torch.distributed as dist
ap = argparse.ArgumentParser(); ap.add_argument("--offload", default="none"); ap.add_argument("--force", type=int, default=1)
a = ap.parse_args()
dist.init_process_group("gloo")          # the trainer's own process group
import deepspeed
from common import build, batches
from common_ds import ds_config, mean_all
rank = dist.get_rank()
cfg = ds_config()
if a.offload != "none":
    cfg["zero_optimization"]["offload_optimizer"] = {"device": a.offload}
    cfg["zero_optimization"]["offload_param"] = {"device": a.offload}
    cfg["zero_force_ds_cpu_optimizer"] = bool(a.force)
model = build("uint8")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
try:
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
except Exception as e:
    if rank == 0: print("initialize FAILED:", type(e).__name__, str(e)[:500], flush=True)
    raise SystemExit(0)
losses = []
for b in batches(3):
    row = b[rank:rank + 1]; loss = engine(input_ids=row, labels=row).loss
    engine.backward(loss); engine.step(); losses.append(round(mean_all(loss.item()), 6))
if rank == 0: print("ok; dist backend", dist.get_backend(), "losses", losses, "(ref 5.561544, 5.505013, 5.584572)", flush=True)
