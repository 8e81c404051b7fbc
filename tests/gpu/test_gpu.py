"""GPU checks (skipped without CUDA; the sharded ones need 2 GPUs). Run with `make test-gpu`; results of the
runs recorded for the README are in bench/results/."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import BIN, ROOT, launch, run_env


def worker_lines(command: list[str]) -> list[dict]:
    """Run a GPU worker script; the JSON lines it printed."""
    proc = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(x) for x in proc.stdout.strip().splitlines() if x.startswith("{")]


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@two_gpus
@pytest.mark.parametrize(
    "shape, extra",
    [
        ("llama3-8b", []),
        ("llama3-70b", ["model.shape.num_hidden_layers=20"]),
        ("llama3-8b", ["parallel.backend=deepspeed"]),
        ("llama3-70b", ["model.shape.num_hidden_layers=20", "parallel.backend=deepspeed"]),
        ("llama3-70b", ["model.shape.num_hidden_layers=20", "parallel.sharding_strategy=NO_SHARD"]),
    ],
    ids=[
        "8b",
        "70b-proxy-20-layers",
        "8b-zero3",
        "70b-proxy-20-layers-zero3",
        "70b-proxy-20-layers-no-shard",
    ],
)
def test_sharded_logits_equal_one_gpu(shape, extra):
    """The wrapped model's logits are the 1-GPU model's; each rank holds half of it, or all of it with NO_SHARD
    (the 80-layer 70B target row's setting: the 4-bit base whole on each GPU)."""
    result = worker_lines(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "tests/workers/gpu_exact.py", shape, *extra]
    )[-1]
    share = 1.0 if "parallel.sharding_strategy=NO_SHARD" in extra else 0.5
    assert result["rel_l2"] <= 1e-3 and abs(result["rank0_holds"] - share) < 0.05, result
    print(result, file=sys.stderr)


def test_speed_levers_match_the_plain_path():
    """Packing (through SDPA's mask and through torch's varlen kernel), Liger's fused kernels, bf16 adapter
    compute and the fused LoRA update against the plain path, one GPU, bf16."""
    results = {r["check"]: r for r in worker_lines([sys.executable, "tests/workers/gpu_levers.py"])}
    print(results, file=sys.stderr)
    # bf16 compute: kernels that sum in another order differ by bf16 rounding, not more
    for name in ("packed-vs-padded", "fused-vs-plain", "fused-packed-vs-plain-padded", "lora-fused-vs-peft"):
        assert results[name]["loss_rel_diff"] < 2e-3 and results[name]["min_grad_cosine"] > 0.99, name
    assert results["packed-vs-padded"]["per_token_max_abs_diff"] < 0.1
    # packed rows through torch's varlen kernel (sdpa_varlen, the default on a GPU without flash-attn), which ran
    varlen = results["varlen-packed-vs-padded"]
    assert varlen["kernel_calls"] == 4 * 2, varlen
    assert varlen["loss_rel_diff"] < 2e-3 and varlen["min_grad_cosine"] > 0.99, varlen
    assert varlen["per_token_max_abs_diff"] < 0.1, varlen
    assert results["adapters-bf16-vs-fp32"]["loss_rel_diff"] < 1e-2
    assert results["adapters-bf16-vs-fp32"]["min_grad_cosine"] > 0.98
    # the dropout masks drawn again in backward are the ones drawn in forward: every number bit-identical
    replayed = results["lora-dropout-replayed-vs-kept"]
    assert all(replayed[k] is True for k in ("output", "grad_x", "grad_a", "rng_after")), replayed
    # the dropout kernel: its mask drawn again in backward (bit-for-bit repeatable, the generator moved on),
    # keeping 1 - p of the inputs, with outputs and gradients at least as close to fp64 as autograd's bf16 path
    kernel = results["lora-dropout-kernel"]
    assert kernel["repeatable"] is True and kernel["rng_advanced"] is True, kernel
    assert abs(kernel["keep_rate"] - 0.95) < 1e-3, kernel
    for name in ("out", "grad_x", "grad_a"):
        assert kernel[f"{name}_rel_err"] <= max(kernel[f"{name}_autograd_rel_err"], 1e-3) < 5e-3, (
            name,
            kernel,
        )
    # activation checkpointing recomputes the same keep bits: the same loss; gradients as close as a rerun's, far
    # closer than another draw's
    ckpt = results["dropout-kernel-checkpointed-vs-not"]
    assert ckpt["loss_equal"] is True, ckpt
    assert ckpt["min_grad_cosine"] > 0.9999 and ckpt["rerun_min_grad_cosine"] > 0.9999, ckpt
    assert ckpt["other_draw_min_grad_cosine"] < 0.999, ckpt
    # base and adapter in one Function: as close to fp64 as the separate path (measured: equal on this layer)
    for p in ("0.0", "0.05"):
        one = results[f"one-function-p{p}"]
        assert one["one_function_fn"] == "_LinearWithAdapterBackward" != one["separate_fn"], one
        for name in ("out", "grad_x", "grad_a", "grad_b"):
            ours, theirs = one[f"one_function_{name}_rel_err"], one[f"separate_{name}_rel_err"]
            assert ours <= max(1.05 * theirs, 1e-3) < 5e-3, (p, name, one)
    model = results["one-function-vs-separate-model"]
    assert model["loss_rel_diff"] < 1e-3 and model["min_grad_cosine"] > 0.9999, model
    # the one-kernel NF4 dequantization gives bitsandbytes' weights: one layer's output and input gradient bit
    # for bit, the model's loss too; its gradients within bf16 rounding (base and adapter in one Function sum
    # the input gradients in another order)
    nf4 = results["nf4-kernel-vs-bitsandbytes"]
    assert nf4["modules"] == 4 * 7 and nf4["layer_bit_identical"] is True and nf4["loss_equal"] is True, nf4
    assert nf4["min_grad_cosine"] > 0.9999 and nf4["bnb_rerun_min_grad_cosine"] > 0.9999, nf4


def test_cpu_offload_keeps_host_memory_near_the_shards():
    """parallel.cpu_offload through FSDP (forced on one GPU, 70B widths x 20 layers): with shardtune's lean
    buffers (parallel.lean_offload) the host peak stays under 2x the offloaded shards, where FSDP's own pinned
    copies and gradient buffers take 3.4x; the loss is the same."""
    runs = {}
    for lean in ("0", "1"):
        command = [str(BIN / "torchrun"), "--nproc_per_node", "1", "bench/offload_probe.py", "--lean", lean]
        runs[lean] = worker_lines(command)[-1]
    print(runs, file=sys.stderr)
    start = runs["1"]["start"]["rss"]
    shards = runs["1"]["loaded"]["rss"] - start  # the model is in host memory once built
    lean_peak, own_peak = runs["1"]["step2"]["peak"] - start, runs["0"]["step2"]["peak"] - start
    assert runs["1"]["loss"] == runs["0"]["loss"]
    assert lean_peak < 2 * shards < 3 * shards < own_peak, (shards, lean_peak, own_peak)


def paged_round_trip(name: str, device: str, directory) -> dict:
    """optim.name's optimizer over adapter-sized tensors on `device`, saved and loaded the way checkpoints do it
    (DCP, in place, by name: parallel/adapters.whole_adapters_state): 2 steps, a save, 3 more; a fresh
    optimizer loaded from the save takes the same 3 steps. Fixed gradients, so the comparison is of the
    optimizer alone. Returns what the test checks."""
    import torch.distributed.checkpoint as dcp

    from shardtune.config import OptimConfig
    from shardtune.parallel.adapters import whole_adapters_state
    from shardtune.train.optim import build_optimizer

    torch.manual_seed(0)
    # bitsandbytes pages tensors of 1e5 elements and more (the first), keeps smaller ones in GPU memory
    module = torch.nn.Sequential(torch.nn.Linear(1024, 128, bias=False), torch.nn.Linear(128, 300)).to(device)
    params = list(module.parameters())
    grads = [[torch.randn_like(p) for p in params] for _ in range(5)]

    def steps(optimizer, which):
        for k in which:
            for p, g in zip(params, grads[k], strict=True):
                p.grad = g.clone()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    settings = OptimConfig(name=name, lr=1e-2, weight_decay=0.01)
    first = build_optimizer(settings, params)
    steps(first, (0, 1))
    msd, osd = whole_adapters_state(module, first)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory), no_dist=True)
    steps(first, (2, 3, 4))
    expected = [p.detach().clone() for p in params]
    again = build_optimizer(settings, params)
    msd, osd = whole_adapters_state(module, again, fresh=True)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(directory), no_dist=True)
    state = again.state[params[0]]
    paged = getattr(state["state1"], "is_paged", False)
    steps(again, (2, 3, 4))
    return {
        "equal": all(torch.equal(p.detach(), e) for p, e in zip(params, expected, strict=True)),
        "paged": paged,
        "dtype": str(state["state1"].dtype),
        "step": int(again.state[params[0]]["step"]),
    }


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_state_is_paged_and_resumes_exactly(tmp_path, name):
    """On a GPU the paged optimizers' state lives in CUDA unified memory (bitsandbytes' get_paged); it goes
    into a checkpoint and comes back in place, the steps after it bit for bit the uninterrupted ones'."""
    result = paged_round_trip(name, "cuda", tmp_path / "ckpt")
    print(name, result, file=sys.stderr)
    assert result["equal"] and result["paged"] and result["step"] == 5, result
    assert result["dtype"] == ("torch.uint8" if name.endswith("8bit") else "torch.float32"), result


def test_paged_adamw_8bit_run_on_one_gpu_resumes(tmp_path):
    """The tiny recipe with optim.name=paged_adamw_8bit on one GPU (not refused there), stopped by SIGTERM and
    resumed: it completes, from the checkpoint, with the uninterrupted run's losses (to float tolerance: GPU
    kernels need not be deterministic run to run). The tiny model's adapters are under bitsandbytes' paging
    threshold (1e5 elements): this checks the run's path; the test above, the paged state."""
    from test_resume import RUN, losses

    args = [*RUN, "optim.name=paged_adamw_8bit", "train.run_name=run"]
    launch([*args, f"train.output_dir={tmp_path / 'whole'}"], nproc=1, launcher="python")
    cut = [*args, f"train.output_dir={tmp_path / 'cut'}"]
    first = launch(
        cut,
        nproc=1,
        launcher="python",
        env={"SHARDTUNE_FAULT": "rank=0,step=5,micro=1,action=sigterm"},
        check=False,
    )
    assert first.returncode == 75, first.stderr[-3000:]
    second = launch(cut, nproc=1, launcher="python")
    assert "resumed from" in second.stderr and "Paged optimizers are not supported" not in second.stderr
    whole, resumed = losses(tmp_path / "whole" / "run"), losses(tmp_path / "cut" / "run")
    assert resumed.keys() == whole.keys() and len(whole) == 12
    assert all(resumed[s] == pytest.approx(whole[s], rel=1e-4) for s in whole), (whole, resumed)


@pytest.mark.parametrize("mode, share", [("offload", 0.5), ("ork", 0.9)])
def test_activation_offloading_is_exact_and_keeps_the_activations_off_the_gpu(mode, share):
    """parallel.activation_checkpointing=offload on one GPU (bf16, LoRA dropout through the Triton kernel), and
    the mix 'ork' (o r k o: layer 0 offloaded, 1 recomputed, 2 and 3 kept): the loss and adapter gradients bit
    for bit those of keeping the activations, and after the forward the GPU holds a fraction (`share`) of what
    it holds when they are kept (the saved tensors are in pinned host memory, the topmost o's excepted)."""
    from levers import batches, build, loss_and_grads

    from shardtune.train.objectives import token_loss_sum
    from shardtune.train.step import compute_context

    device = torch.device("cuda", 0)
    settings = {"parallel.mixed_precision": "bf16", "lora.dropout": 0.1}
    _, kept = build(settings, device)
    held = {}
    _, offloaded = build({**settings, "parallel.activation_checkpointing": mode}, device, keep=held)
    padded, _ = batches([1024] * 4, 384, 2, device)  # 4 x 1024 tokens: 2 MiB per bf16 activation
    kept.train(), offloaded.train()

    def held_after_forward(model):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with compute_context(device, torch.bfloat16):
            loss = token_loss_sum(model, padded, False)
        torch.cuda.synchronize()
        torch.empty(1, device=device)  # lets the allocator take back blocks whose copies are done
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        model.zero_grad(set_to_none=True)
        return held

    results = {}
    for name, model in (("kept", kept), ("offloaded", offloaded)):
        held_after_forward(model)  # warm-up: kernels compiled, pinned blocks cached
        torch.manual_seed(5)
        results[name] = (
            *loss_and_grads(model, padded, autocast_dtype=torch.bfloat16),
            held_after_forward(model),
        )
    (lk, gk, mk), (lo, go, mo) = results["kept"], results["offloaded"]
    offloader = held["backend"].offloader
    print({"held_kept_mib": mk / 2**20, "held_offloaded_mib": mo / 2**20,
           "offloaded_mib": offloader.bytes_offloaded / 2**20}, file=sys.stderr)  # fmt: skip
    assert lo == lk
    for name in gk:
        torch.testing.assert_close(go[name], gk[name], rtol=0, atol=0)
    assert offloader.bytes_offloaded > 0 and mo < share * mk, (mo, mk)
