"""Shared helpers: a tiny Llama with NF4 Linear4bit decoder linears + PEFT LoRA, fixed data."""
import os
import torch
from torch import nn

STORAGE = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config():
    from transformers import LlamaConfig
    h, L = int(os.environ.get("TINY_HIDDEN", 64)), int(os.environ.get("TINY_LAYERS", 2))
    return LlamaConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=L, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=256, max_position_embeddings=64,
                       tie_word_embeddings=False, use_cache=False)


def quantize_layer(layer, storage, compute_dtype):
    """Replace every nn.Linear under `layer` by an NF4 Linear4bit holding the same weights (quantized on CPU)."""
    import bitsandbytes as bnb
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      quant_storage=storage, device="meta")
                p = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False, compress_statistics=True,
                                      quant_type="nf4", quant_storage=storage, module=q)
                q.weight = p._quantize("cpu")
                q.support_avx512bf16_for_cpu = False
                setattr(parent, name, q)


def build_base(storage="uint8", compute_dtype=torch.float32, seed=0):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config())
    for layer in model.model.layers:
        quantize_layer(layer, STORAGE[storage], compute_dtype)
    model.requires_grad_(False)
    return model


def add_lora(model, seed=1):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapters change the logits from step 0
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, cfg)


def build(storage="uint8", compute_dtype=torch.float32):
    return add_lora(build_base(storage, compute_dtype))


def batch(rows=2, seq=16, seed=123):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, seq), generator=g)
    return ids


def batches(n_steps, rows=2, seq=16):
    return [batch(rows, seq, seed=100 + i) for i in range(n_steps)]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def lora_state(model):
    return {n: p.detach().clone().float() for n, p in model.named_parameters() if "lora_" in n}
