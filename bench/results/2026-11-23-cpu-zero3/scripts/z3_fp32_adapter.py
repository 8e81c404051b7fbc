"""bf16 ZeRO-3: module LoRA params are bf16 copies; the fp32 masters live in the optimizer partitions.
Get the full fp32 adapter with deepspeed.utils.safe_get_full_fp32_param (collective: call on every rank)."""
import torch, torch.distributed as dist, deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
from common import build, batches
from common_ds import ds_config, make_engine
deepspeed.init_distributed(dist_backend="gloo"); rank = dist.get_rank()
engine = make_engine(build("uint8", torch.bfloat16), ds_config(bf16=True), lr=1e-3)
for b in batches(2):
    row = b[rank:rank + 1]; loss = engine(input_ids=row, labels=row).loss; engine.backward(loss); engine.step()
named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
fp32 = {n: safe_get_full_fp32_param(p) for n, p in named}            # every rank gets the full tensor
with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
    b16 = {n: p.detach().clone() for n, p in named}
if rank == 0:
    n0 = named[0][0]
    print("module param dtype", b16[n0].dtype, "| fp32 master dtype", fp32[n0].dtype, tuple(fp32[n0].shape))
    print("max |bf16(master) - module param| over all LoRA:", max((fp32[n].to(torch.bfloat16).float() - b16[n].float()).abs().max().item() for n in fp32))
    print("max |master - module param| (bf16 rounding):", max((fp32[n] - b16[n].float()).abs().max().item() for n in fp32))
