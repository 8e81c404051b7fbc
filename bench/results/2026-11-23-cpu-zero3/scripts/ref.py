"""Unsharded single-process reference: same model, 2 rows per step, torch AdamW over LoRA params."""
import argparse, torch
from common import build, batches, batch, lora_state
ap = argparse.ArgumentParser()
ap.add_argument("--storage", default="uint8"); ap.add_argument("--compute", default="fp32")
ap.add_argument("--steps", type=int, default=3); ap.add_argument("--rows", type=int, default=2); ap.add_argument("--lr", type=float, default=1e-2)
ap.add_argument("--clip", type=float, default=0.0); ap.add_argument("--cast-bf16", action="store_true"); ap.add_argument("--master", action="store_true"); ap.add_argument("--out", default="ref.pt")
a = ap.parse_args()
cd = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.compute]
torch.manual_seed(0)
model = build(a.storage, cd)
if a.cast_bf16:  # what deepspeed.initialize does with bf16 enabled: every floating param -> bf16 (Params4bit in uint8 untouched)
    import bitsandbytes as bnb
    for p in model.parameters():
        if p.dtype.is_floating_point and not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.to(torch.bfloat16)
ids = batch(2)
with torch.no_grad():
    logits0 = model(input_ids=ids).logits.float()
train = [p for p in model.parameters() if p.requires_grad]
master = [p.detach().float().clone().requires_grad_(True) for p in train] if a.master else train  # fp32 master weights (what DeepSpeed bf16 does)
opt = torch.optim.AdamW(master, lr=a.lr, weight_decay=0.0)
losses, gnorms = [], []
for ids_s in batches(a.steps, rows=a.rows):
    loss = model(input_ids=ids_s, labels=ids_s).loss
    loss.backward()
    if a.master:
        for m, p in zip(master, train): m.grad = p.grad.float(); p.grad = None
    gn = torch.nn.utils.clip_grad_norm_(master, a.clip if a.clip > 0 else float("inf"))
    opt.step(); opt.zero_grad()
    if a.master:
        with torch.no_grad():
            for m, p in zip(master, train): p.copy_(m)
    losses.append(loss.item()); gnorms.append(gn.item())
with torch.no_grad():
    logits1 = model(input_ids=ids).logits.float()
print("ref losses", [round(x, 6) for x in losses], "gnorms", [round(x, 5) for x in gnorms])
torch.save(dict(logits0=logits0, logits1=logits1, losses=losses, gnorms=gnorms, lora=lora_state(model)), a.out)
