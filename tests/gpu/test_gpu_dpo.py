"""GPU checks of preference tuning (skipped without CUDA; the sharded ones need 2 GPUs). Not yet run: written
on a CPU-only machine for the next GPU session (`make test-gpu`).

- the DPO reference (the adapters off) under the GPU-only LoRA paths: the Triton dropout kernel and base + adapter
  in one Function (kernels/fused_lora.py), and Liger's fused kernels, whose forward must still give logits;
- packed pairs through the varlen attention kernel against padded ones;
- the 2-GPU demo under FSDP and ZeRO-3;
- bench/dpo_vs_trl.py on the 8B shape (its JSON lines are the figures for BENCHMARKS.md)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import BIN, ROOT, run_env

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def _model(**overrides):
    from shardtune.config import Config, apply_overrides
    from shardtune.model import loading, modeling
    from shardtune.parallel.backend import backend_for
    from shardtune.parallel.distributed import DistInfo

    settings = {"parallel.mixed_precision": "bf16", "lora.dropout": "0.1", "model.fused_kernels": "auto"}
    cfg = apply_overrides(Config(), {**settings, **overrides}, "gpu test")
    device = torch.device("cuda", 0)
    hf_config = modeling.model_config(cfg)
    cfg = apply_overrides(cfg, {"model.fused_kernels": modeling.fused_kernels(cfg, hf_config, "cuda")}, "x")
    backend = backend_for(cfg.parallel, cfg.param_dtype, DistInfo.alone(device), 4, 1.0)
    attn = modeling.attention_implementation("auto", device)
    model, _ = loading.build_model(cfg, hf_config, None, attn, backend, device)
    with torch.no_grad():  # B = 0 at init: the adapters must change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return cfg, model


def _pairs(n=4):
    from shardtune.config import GeneratedTaskConfig
    from shardtune.data.formats import RowFormatter, encode
    from shardtune.data.tasks import generate_rows
    from shardtune.model.tokenizer import build_tiny_tokenizer, prepare_tokenizer

    tok = prepare_tokenizer(build_tiny_tokenizer(), None, None)
    rows = generate_rows(GeneratedTaskConfig(rows=n), 0, pairs=True)
    return tok, encode(RowFormatter("preference", tok, "generated"), rows, 512, True)


def test_the_dpo_reference_is_the_base_under_the_gpu_lora_paths():
    """In training mode with dropout (the Triton kernel's path) and Liger's kernels where installed: the
    reference forward (disable_adapter) equals the model with every lora_B zeroed, and DPO's packed pairs give
    the padded pairs' sums."""
    from shardtune.config import ObjectiveConfig
    from shardtune.data.loader import collate, row_bounds
    from shardtune.train.objectives import objective_for
    from shardtune.train.step import compute_context

    _, model = _model()
    tok, enc = _pairs()
    device = torch.device("cuda", 0)
    model.train()
    padded = {k: v.to(device) for k, v in collate(enc.sequences([0, 1, 2, 3]), tok.pad_token_id).items()}
    with torch.no_grad(), compute_context(device, torch.bfloat16):
        with model.disable_adapter():
            off = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        saved = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
        for n, p in model.named_parameters():
            if n in saved:
                p.zero_()
        zero = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    assert torch.equal(off, zero)
    dpo = objective_for(ObjectiveConfig(name="dpo"), reference=model.disable_adapter)
    packed = collate(enc.sequences([0, 1, 2, 3]), tok.pad_token_id, packed=True)
    lengths = packed["lengths"]
    packed = {k: v.to(device) for k, v in packed.items()}
    packed.update(row_bounds(lengths, device), lengths=lengths)
    padded["lengths"] = padded["lengths"].cpu()
    model.eval()  # no dropout: the same function of the same rows
    with torch.no_grad(), compute_context(device, torch.bfloat16):
        a = {k: v.item() for k, v in dpo.sums(model, padded).items()}
        b = {k: v.item() for k, v in dpo.sums(model, packed).items()}
    print(json.dumps({"padded": a, "packed": b}), file=sys.stderr)
    for k in a:  # bf16 compute: kernels that sum in another order differ by rounding
        assert b[k] == pytest.approx(a[k], rel=2e-2, abs=2e-2), k


@two_gpus
@pytest.mark.parametrize("config", ["fsdp_configs/2xh100.yaml", "fsdp_configs/zero3_2xh100.yaml"])
def test_the_dpo_demo_on_two_gpus(tmp_path, config):
    """recipes/tiny_dpo.py on 2 GPUs (bf16, the GPU kernels): it learns the pairs as on the CPU."""
    proc = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--config_file", config, "recipes/tiny_dpo.py",
         f"train.output_dir={tmp_path}", "train.run_name=dpo", "eval.samples=4"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    print(json.dumps({k: summary["final_eval"][k] for k in summary["final_eval"]}), file=sys.stderr)
    assert summary["final_eval"]["eval_rewards/accuracies"] >= 0.9
    assert summary["final_eval_loss"] < 0.5 * summary["first_eval_loss"]


def test_dpo_against_trl_on_the_8b_shape():
    """bench/dpo_vs_trl.py as written (llama3-8b, random weights, 10 steps, one GPU): both systems run; their
    tokens/s and peak memory are printed for the record (BENCHMARKS.md), not asserted."""
    pytest.importorskip("trl")
    proc = subprocess.run(
        [sys.executable, "bench/dpo_vs_trl.py"], cwd=ROOT, env=run_env(), capture_output=True, text=True,
        timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    print("\n".join(json.dumps(line) for line in lines), file=sys.stderr)
    assert [line["system"] for line in lines] == ["shardtune", "trl"]
    assert lines[0]["tokens_per_pair"] == lines[1]["tokens_per_pair"]
    assert all(line["peak_gpu_gib"] > 0 for line in lines)
