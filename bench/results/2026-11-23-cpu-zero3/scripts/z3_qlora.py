"""2-process DeepSpeed ZeRO-3 on CPU/gloo: tiny Llama, NF4 Linear4bit decoder linears, PEFT LoRA, torch AdamW.
torchrun --nproc_per_node 2 z3_qlora.py --storage uint8 [--bf16] [--ref ref_uint8.pt]"""
import argparse, json, os, time, torch
import torch.distributed as dist
ap = argparse.ArgumentParser()
ap.add_argument("--storage", default="uint8"); ap.add_argument("--compute", default="fp32")
ap.add_argument("--bf16", action="store_true"); ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--lr", type=float, default=1e-2); ap.add_argument("--clip", type=float, default=0.0)
ap.add_argument("--ref", default=None); ap.add_argument("--persist", type=int, default=0)
ap.add_argument("--ckpt", default=None)
a = ap.parse_args()

import deepspeed, bitsandbytes as bnb
from deepspeed.accelerator import get_accelerator
from common import build, batches, batch, rel, lora_state
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
log = lambda *x: print(f"[rank{rank}]", *x, flush=True)
if rank == 0:
    log("accelerator", get_accelerator().device_name(), "comm", get_accelerator().communication_backend_name(),
        "dist backend", dist.get_backend())
cd = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.compute]
model = build(a.storage, cd)

# reference dequantized weights before partitioning
ref_deq = {}
for n, m in model.named_modules():
    if isinstance(m, bnb.nn.Linear4bit):
        ref_deq[n] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
cfg = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": a.persist,
                          "stage3_model_persistence_threshold": 0 if a.persist == 0 else 10**12},
    "bf16": {"enabled": a.bf16}, "gradient_clipping": a.clip, "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
engine, opt_, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
log("engine optimizer", type(engine.optimizer).__name__)

# (b) Params4bit after partitioning
info = []
for n, m in engine.module.named_modules():
    if isinstance(m, bnb.nn.Linear4bit):
        w = m.weight
        info.append((n, type(w).__name__, str(w.dtype), tuple(w.data.shape), tuple(getattr(w, "ds_shape", ())),
                     tuple(w.ds_tensor.shape) if hasattr(w, "ds_tensor") else None, str(getattr(w, "ds_status", None)),
                     w.quant_state is not None, "persist", getattr(w, "ds_persist", None)))
if rank == 0:
    for row in info[:2]: log("after init:", row)
    lora = [(n, tuple(p.data.shape), str(p.dtype), str(getattr(p, 'ds_status', None)), 'persist', getattr(p, 'ds_persist', None)) for n, p in engine.module.named_parameters() if "lora_A" in n][:1]
    log("lora param after init:", lora)
    other = [(n, str(p.dtype), tuple(p.data.shape), tuple(p.ds_shape)) for n, p in engine.module.named_parameters() if "norm" in n or "embed" in n][:2]
    log("other params:", other)

checks = []
def hook(mod, inp):
    w = mod.weight
    deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    checks.append((mod._qname, type(w).__name__, tuple(w.shape), str(w.ds_status), (deq - ref_deq[mod._qname]).abs().max().item()))
hs = []
for n, m in engine.module.named_modules():
    if isinstance(m, bnb.nn.Linear4bit):
        m._qname = n; hs.append(m.register_forward_pre_hook(hook))

ids = batch(2)[rank:rank + 1]
with torch.no_grad():
    logits0 = engine(input_ids=ids).logits.float()
for h in hs: h.remove()
bad = [c for c in checks if c[4] != 0.0]
log(f"forward gather checks: {len(checks)} Linear4bit calls, class/shape sample {checks[0][1:4]}, max |deq-ref| over all = {max(c[4] for c in checks)}")

losses = []
t = time.time()
for ids_s in batches(a.steps):
    row = ids_s[rank:rank + 1]
    loss = engine(input_ids=row, labels=row).loss
    engine.backward(loss)
    engine.step()
    l = loss.detach().float().clone(); dist.all_reduce(l); losses.append(l.item() / world)
    gn = engine.get_global_grad_norm()
    if rank == 0: log(f"step {engine.global_steps} mean loss {losses[-1]:.6f} grad_norm {float(gn) if gn is not None else None}")
log(f"train time {time.time()-t:.2f}s")
with torch.no_grad():
    logits1 = engine(input_ids=ids).logits.float()

# (d) gather the full LoRA on rank 0
lora_params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
with deepspeed.zero.GatheredParameters([p for _, p in lora_params], modifier_rank=None):
    full = {n: p.detach().clone().float() for n, p in lora_params} if rank == 0 else None

# logits of all ranks to rank 0
g0 = [torch.empty_like(logits0) for _ in range(world)]; dist.all_gather(g0, logits0)
g1 = [torch.empty_like(logits1) for _ in range(world)]; dist.all_gather(g1, logits1)
for refpath in (a.ref.split(",") if (rank == 0 and a.ref) else []):
    ref = torch.load(refpath); log("--- vs", refpath)
    L0, L1 = torch.cat(g0), torch.cat(g1)
    log(f"(a) logits rel L2 vs unsharded at init: {rel(L0, ref['logits0']):.3e}; after {a.steps} steps: {rel(L1, ref['logits1']):.3e}")
    log("(c) losses ds ", [round(x, 6) for x in losses]); log("(c) losses ref", [round(x, 6) for x in ref['losses']])
    log("    max |dloss|", max(abs(x - y) for x, y in zip(losses, ref['losses'])))
    worst = max(rel(full[n], ref['lora'][n]) for n in full)
    log(f"(d) gathered LoRA: {len(full)} tensors, shapes e.g. {tuple(next(iter(full.values())).shape)}; worst rel L2 vs ref after training {worst:.3e}")
if a.ckpt:
    torch.save(dict(losses=losses), f"{a.ckpt}.losses.r{rank}")
dist.barrier()
