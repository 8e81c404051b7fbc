"""Gradient accumulation + clipping under ZeRO-3 (2 procs). Step s uses the 4 rows of batches(rows=4)[s];
rank r, micro-step m takes row 2*m + r.  Compare: python ref.py --rows 4 --clip C"""
import argparse, torch, torch.distributed as dist
ap = argparse.ArgumentParser()
ap.add_argument("--gas", type=int, default=2); ap.add_argument("--clip", type=float, default=0.0)
ap.add_argument("--steps", type=int, default=3); ap.add_argument("--ref", default=None)
ap.add_argument("--double-backward", action="store_true", help="config gas=1, backward(loss/2) twice then one step")
ap.add_argument("--manual", action="store_true", help="set_gradient_accumulation_boundary by hand")
a = ap.parse_args()
import deepspeed
from common import build, batches
from common_ds import ds_config, make_engine, mean_all
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
engine = make_engine(build("uint8"), ds_config(gas=1 if a.double_backward else a.gas, clip=a.clip), lr=1e-2)
if a.double_backward:
    for s, ids in enumerate(batches(a.steps, rows=4)):
        tot = 0.0
        for m in range(2):
            row = ids[2 * m + rank: 2 * m + rank + 1]
            loss = engine(input_ids=row, labels=row).loss
            engine.backward(loss / 2); tot += mean_all(loss.item()) / 2
        engine.step()
        if rank == 0: print(f"double-backward step {s}: loss {tot:.6f} grad_norm {float(engine.get_global_grad_norm()):.5f}", flush=True)
    raise SystemExit
losses, trace = [], []
for s, ids in enumerate(batches(a.steps, rows=2 * a.gas)):
    step_loss = 0.0
    for m in range(a.gas):
        row = ids[2 * m + rank: 2 * m + rank + 1]
        if a.manual:
            engine.set_gradient_accumulation_boundary(m == a.gas - 1)
        b = engine.is_gradient_accumulation_boundary()
        loss = engine(input_ids=row, labels=row).loss
        engine.backward(loss)          # scales by 1/gas itself (scale_wrt_gas=True default)
        engine.step()                  # no-op for the optimizer unless at the boundary
        step_loss += mean_all(loss.item()) / a.gas
        trace.append((s, m, b, engine.global_steps, engine.micro_steps))
    gn = engine.get_global_grad_norm()
    losses.append(step_loss)
    if rank == 0: print(f"step {s}: loss {step_loss:.6f} grad_norm(pre-clip) {float(gn):.5f}", flush=True)
if rank == 0:
    print("(micro trace: step, micro, is_boundary before fwd, global_steps, micro_steps)", trace)
    if a.ref:
        ref = torch.load(a.ref)
        print("ref losses", [round(x, 6) for x in ref["losses"]], "ref gnorms", [round(x, 5) for x in ref["gnorms"]])
        print("max |dloss|", max(abs(x - y) for x, y in zip(losses, ref["losses"])))
