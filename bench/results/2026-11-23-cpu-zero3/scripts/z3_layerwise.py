"""Q3: partition the model layer by layer as it is built (no rank ever holds the whole model), then
deepspeed.initialize the whole thing.  Meta skeleton -> per decoder layer: materialize (seeded per-name weights),
NF4-quantize, init LoRA, deepspeed.zero.Init(module=layer, config_dict_or_path=cfg) -> root left to initialize.
  python  z3_layerwise.py --ref            (unsharded reference, same weights, plain AdamW)
  torchrun --nproc_per_node 2 z3_layerwise.py [--bf16]"""
import argparse, os, zlib, resource, torch, torch.distributed as dist
from torch import nn
ap = argparse.ArgumentParser()
ap.add_argument("--ref", action="store_true"); ap.add_argument("--bf16", action="store_true")
ap.add_argument("--cast", action="store_true", help="cast float params of each layer to bf16 before zero.Init")
ap.add_argument("--root", choices=["initialize", "init"], default="initialize")
ap.add_argument("--steps", type=int, default=3); ap.add_argument("--all-then-init", action="store_true", help="baseline: materialize the whole model, then deepspeed.initialize")
a = ap.parse_args()
import bitsandbytes as bnb
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
from common import llama_config, TARGETS, batch, batches, rel

def get(name, shape, kind):
    if kind == "norm": return torch.ones(shape)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, 0.02, generator=g)

def skeleton():
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config())
        for layer in model.model.layers:
            for parent in list(layer.modules()):
                for n, c in list(parent.named_children()):
                    if type(c) is nn.Linear:
                        setattr(parent, n, bnb.nn.Linear4bit(c.in_features, c.out_features, bias=False,
                                compute_dtype=torch.bfloat16 if a.bf16 else torch.float32, compress_statistics=True,
                                quant_type="nf4", quant_storage=torch.uint8, device="meta"))
        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    return model

def materialize(module, prefix):
    for mn, m in module.named_modules():
        full = f"{prefix}.{mn}" if mn else prefix
        if isinstance(m, bnb.nn.Linear4bit):
            w = get(full + ".weight", (m.out_features, m.in_features), "matrix")
            p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.uint8, module=m)
            m.weight = p._quantize("cpu"); m.support_avx512bf16_for_cpu = False
            continue
        if any(part.startswith("lora_") for part in mn.split(".")) and not isinstance(m, nn.Linear):
            continue
        for pn, p in list(m.named_parameters(recurse=False)):
            if not p.is_meta: continue
            kind = "norm" if "norm" in type(m).__name__.lower() else "matrix"
            m._parameters[pn] = nn.Parameter(get(f"{full}.{pn}", tuple(p.shape), kind), requires_grad="lora_" in full)
    for parent in list(module.modules()):   # rotary buffers
        for n, c in list(parent.named_children()):
            if hasattr(c, "inv_freq") and c.inv_freq.is_meta:
                setattr(parent, n, type(c)(config=llama_config()))

def peak_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

rss0 = peak_mb()
model = skeleton()
layers = model.base_model.model.model.layers
if a.ref:
    materialize(model.base_model.model, "m")  # whole model in one process
    ids = batch(2)
    with torch.no_grad(): logits0 = model(input_ids=ids).logits.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for b in batches(a.steps):
        loss = model(input_ids=b, labels=b).loss; loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    print("ref losses", losses); torch.save(dict(logits0=logits0, losses=losses), "ref_layerwise.pt"); raise SystemExit

import deepspeed
from common_ds import ds_config, make_engine, mean_all
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
def log(*x):
    if rank == 0: print(*x, flush=True)
cfg = ds_config(bf16=a.bf16)
for i, layer in enumerate([] if a.all_then_init else layers):
    materialize(layer, f"m.model.layers.{i}")
    if a.cast:
        for p in layer.parameters():
            if p.dtype.is_floating_point and not isinstance(p, bnb.nn.Params4bit): p.data = p.data.to(torch.bfloat16)
    full = sum(p.numel() for p in layer.parameters())
    deepspeed.zero.Init(module=layer, config_dict_or_path=cfg)      # partitions the existing params in place
    held = sum(p.data.numel() for p in layer.parameters()); shard = sum(p.ds_tensor.numel() for p in layer.parameters())
    w = layer.self_attn.q_proj.base_layer.weight
    log(f"layer {i}: {full} elems before, after Init: data elems {held}, ds_tensor elems {shard} on this rank; "
        f"q_proj weight {type(w).__name__} quant_state={w.quant_state is not None} ds_status={w.ds_status}; "
        f"lora dtype {layer.self_attn.q_proj.lora_A.default.weight.dtype}")
# root: embeddings, final norm, lm_head, rotary
for name in ["model.embed_tokens", "model.norm", "lm_head"]:
    materialize(model.base_model.model.get_submodule(name), f"m.{name}")
if a.all_then_init:
    materialize(model.base_model.model, "m")
inner = model.base_model.model.model
inner.rotary_emb = type(inner.rotary_emb)(config=llama_config())   # meta buffer -> real (fp32)
if a.root == "init":
    deepspeed.zero.Init(module=model, config_dict_or_path=cfg)   # skips params already partitioned
log("non-zero params before initialize:", [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")])
engine = make_engine(model, cfg, lr=1e-2)
import gc, psutil; gc.collect()
held = sum(p.data.numel() * p.data.element_size() for p in model.parameters())
shard = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
log(f"after initialize: rank0 holds {held/2**20:.1f} MiB of full params, {shard/2**20:.1f} MiB of shards; current RSS {psutil.Process().memory_info().rss/2**20:.0f} MiB")
log("after initialize: all params ZeRO?", all(hasattr(p, "ds_id") for p in model.parameters()),
    "| dtypes:", sorted({str(p.dtype) for p in model.parameters()}))
ids = batch(2)[rank:rank + 1]
with torch.no_grad(): l0 = engine(input_ids=ids).logits.float()
g = [torch.empty_like(l0) for _ in range(2)]; dist.all_gather(g, l0)
losses = []
for b in batches(a.steps):
    row = b[rank:rank + 1]; loss = engine(input_ids=row, labels=row).loss
    engine.backward(loss); engine.step(); losses.append(mean_all(loss.item()))
if rank == 0 and os.path.exists("ref_layerwise.pt") and not os.environ.get("TINY_HIDDEN"):
    ref = torch.load("ref_layerwise.pt")
    print(f"logits rel L2 vs unsharded: {rel(torch.cat(g), ref['logits0']):.3e}")
    print("losses", [round(x, 6) for x in losses], "ref", [round(x, 6) for x in ref["losses"]])
log(f"peak RSS rank0 {peak_mb():.0f} MB (before import deepspeed/build: {rss0:.0f} MB)")
