"""GPU checks of an 8-bit LLM.int8 base (quant.bits=8; skipped without CUDA, the sharded one needs 2 GPUs). Not yet
run: written on a CPU-only machine for the next GPU session (`make test-gpu`). On a GPU bitsandbytes multiplies
int8 rows in training and in eval alike (on a CPU it trains through the dequantized weight: tests/test_quant_bits.py
checks both there).

- the 8-bit layers shardtune builds on the GPU equal transformers' BitsAndBytesConfig(load_in_8bit=True) ones (int8
  rows, row scales, the forward in both modes, bf16), and their LoRA gradients flow;
- the tiny recipe with quant.bits=8 on 2 GPUs: the whole 8-bit base on each (NO_SHARD, said in the log), the loss
  falls, the base and tuned samples are written, and the adapter merges into the dequantized base."""

import json

import pytest
import torch

from conftest import launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def test_8bit_layers_equal_transformers_load_in_8bit_on_a_gpu(tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from shardtune.config import Config, apply_overrides
    from shardtune.model import loading, modeling
    from shardtune.model.tokenizer import build_tiny_tokenizer
    from shardtune.parallel.distributed import DistInfo
    from shardtune.parallel.fsdp import FsdpBackend

    device = torch.device("cuda", 0)
    cfg = apply_overrides(Config(), {"quant.bits": 8, "parallel.mixed_precision": "bf16"}, "gpu test")
    base = tmp_path / "base"
    modeling.write_random_base(cfg, build_tiny_tokenizer(), base)
    backend = FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo.alone(device))
    mine, _ = loading.build_model(cfg, modeling.model_config(cfg), str(base), "sdpa", backend, device)
    reference = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=modeling.quantization_config(cfg), dtype=torch.bfloat16, device_map={"": 0}
    )
    theirs = dict(reference.named_modules())
    layers = [(n, m) for n, m in mine.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 28
    for name, mod in layers:
        x = torch.randn(
            2, 7, mod.in_features, dtype=torch.bfloat16, device=device
        )  # down_proj: the MLP width
        ref = theirs[loading.checkpoint_name(name + ".weight").removesuffix(".weight")]
        assert mod.weight.device.type == "cuda" and torch.equal(mod.weight.data, ref.weight.data), name
        assert torch.equal(mod.weight.SCB, ref.weight.SCB), name
        with torch.no_grad():
            for training in (True, False):
                mod.train(training), ref.train(training)
                assert torch.equal(mod(x), ref(x)), (name, training)
    mine.train()
    batch = torch.randint(3, 384, (2, 16), device=device)
    with torch.autocast("cuda", torch.bfloat16):
        loss = mine(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = [p.grad for n, p in mine.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@two_gpus
def test_8bit_tiny_recipe_on_two_gpus(tmp_path):
    """Each GPU holds the whole 8-bit base (FSDP cannot shard int8); the run trains, samples base and tuned, and
    its adapter merges into the dequantized base."""
    from shardtune.cli.main import main

    proc = launch(
        [
            "recipes/tiny.py",
            "quant.bits=8",
            "parallel.mixed_precision=bf16",
            "train.max_steps=60",
            "eval.every=30",
            "eval.samples=16",
            f"train.output_dir={tmp_path}",
            "train.run_name=run",
        ]
    )
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["sharding_strategy"] == "NO_SHARD" and s["rank0_holds"] == 1.0
    assert "FSDP cannot shard an 8-bit base" in proc.stderr
    assert s["final_eval_loss"] < 0.5 * s["first_eval_loss"] and s["base_exact_match"] is not None
    saved = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert {(r["step"], r["adapter"]) for r in saved} == {(0, "off"), (30, "on"), (60, "on")}
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
