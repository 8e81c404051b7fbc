"""Correctness of the speed levers on CPU (the GPU side: tests/gpu/test_gpu.py): padding-free packing,
adapters computing in bf16, checkpointing every k-th layer, checkpointing chosen from the GPU's memory, and
`shardtune bench` itself."""

import itertools
import json

import pytest
import torch
from levers import batches, build, loss_and_grads, per_token_losses

from conftest import BIN, ROOT, launch, run_env
from shardtune.config import Config, apply_overrides
from shardtune.errors import ConfigError
from shardtune.model.modeling import fused_kernels, model_config
from shardtune.planning.auto import AUTO_MARGIN, CHECKPOINT_CHOICES, choose_auto
from shardtune.planning.estimate import estimate

CPU = torch.device("cpu")
LENGTHS = [37, 5, 64, 18]  # one row of every micro-batch is the longest; the others would be padded


@pytest.mark.slow
def test_packed_rows_have_the_padded_rows_per_token_loss():
    _, model = build({}, CPU)
    padded, packed = batches(LENGTHS, 384, 2, CPU)
    assert packed["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in packed
    a, b = per_token_losses(model, padded), per_token_losses(model, packed)
    assert a.shape == b.shape and a.numel() == sum(n - n // 4 for n in LENGTHS)  # labels: trained[1:]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the same through backward: the adapters' gradients agree
    (la, ga), (lb, gb) = loss_and_grads(model, padded), loss_and_grads(model, packed)
    assert la == pytest.approx(lb, rel=1e-5)
    for name in ga:  # fp32 sums in another order: equal to rounding
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-4 * ga[name].abs().max().item())


def test_packed_rows_cannot_attend_to_each_other():
    _, model = build({}, CPU)
    _, packed = batches(LENGTHS, 384, 2, CPU)
    before = per_token_losses(model, packed)
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in packed.items()}
    changed["input_ids"][0, : LENGTHS[0]] = (changed["input_ids"][0, : LENGTHS[0]] + 7) % 384  # row 1 only
    after = per_token_losses(model, changed)
    first = LENGTHS[0] - LENGTHS[0] // 4  # labelled positions of row 1
    assert not torch.equal(before[:first], after[:first])  # row 1 did change...
    torch.testing.assert_close(after[first:], before[first:], rtol=0, atol=0)  # ...and no other row noticed


@pytest.mark.slow
def test_sdpa_varlen_is_sdpa_where_its_kernel_cannot_run():
    """sdpa_varlen (varlen.py) sends packed rows, with their boundaries, to torch's varlen Flash kernel on a
    GPU (tests/gpu: against padded SDPA); here on the CPU every batch goes to SDPA and the losses are SDPA's,
    bit for bit. 'auto' keeps plain sdpa on the CPU."""
    from shardtune.kernels import varlen
    from shardtune.model.modeling import attention_implementation

    assert attention_implementation("auto", CPU) == "sdpa"
    _, model = build({}, CPU)
    _, model_varlen = build({}, CPU, attn=varlen.NAME)
    assert model_varlen.config._attn_implementation == varlen.NAME
    padded, packed = batches(LENGTHS, 384, 2, CPU)
    assert packed["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(LENGTHS)]
    assert packed["max_length_q"] == max(LENGTHS)
    for batch in (padded, packed):
        torch.testing.assert_close(
            per_token_losses(model_varlen, batch), per_token_losses(model, batch), rtol=0, atol=0
        )


@pytest.mark.slow
def test_adapters_compute_in_bf16_under_autocast_and_keep_fp32_gradients():
    _, model = build({"parallel.mixed_precision": "bf16"}, CPU)
    padded, _ = batches(LENGTHS, 384, 2, CPU)
    seen = []  # the dtype each adapter matmul computes in (its output's)
    lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
    lora_a.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    loss32, g32 = loss_and_grads(model, padded)  # PEFT's default: inputs cast up to the fp32 adapters
    loss16, g16 = loss_and_grads(model, padded, autocast_dtype=torch.bfloat16)
    assert seen == [torch.float32, torch.bfloat16]
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    for name, g in g16.items():
        assert g.dtype == torch.float32  # the weights, their gradients and AdamW stay fp32
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g32[name].flatten(), dim=0)
        assert cos > 0.98 or g32[name].abs().max() == 0, name


def _count_checkpointed(every: int) -> tuple[int, tuple]:
    """Checkpoint wrappers the loader's backend puts on, and the loss and gradients through them."""
    _, model = build({"parallel.activation_checkpointing": True, "parallel.checkpoint_every": every}, CPU)
    wrapped = sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules())
    padded, _ = batches(LENGTHS, 384, 2, CPU)
    return wrapped, loss_and_grads(model, padded)


@pytest.mark.slow
@pytest.mark.parametrize(
    "bits, dropout, one_function", [(4, 0.1, False), (8, 0.1, False), (16, 0.1, False), (16, 0.0, True)]
)
def test_fused_lora_matches_peft_forward_and_gradients(bits, dropout, one_function):
    """lora.fused (one addmm; without dropout on an unquantized base, base and adapter in one Function) against
    PEFT's own forward: same adapters, same dropout draws, same numbers up to the rounding of the sums, in fp32
    and under bf16 autocast; on a 4-bit, an 8-bit (LLM.int8) and an unquantized base."""
    from peft.tuners.lora import Linear as PeftLinear

    from shardtune.kernels.fused_lora import FusedLinear

    common = {"lora.dropout": dropout, "quant.bits": bits}
    _, peft_model = build({**common, "lora.fused": False}, CPU)
    _, fused_model = build({**common, "lora.fused": True}, CPU)
    assert {type(m) for m in fused_model.modules() if isinstance(m, PeftLinear)} == {FusedLinear}
    assert {type(m) for m in peft_model.modules() if isinstance(m, PeftLinear)} == {PeftLinear}
    ran = set()
    for m in fused_model.modules():
        if isinstance(m, FusedLinear):
            m.register_forward_hook(lambda _m, _i, out: ran.add(type(out.grad_fn).__name__))
    peft_model.train(), fused_model.train()  # dropout on: both draw the same masks from the same seed
    padded, _ = batches(LENGTHS, 384, 2, CPU)
    cosine = lambda a, b: min(  # noqa: E731  (the worst over the adapters)
        torch.nn.functional.cosine_similarity(a[k].flatten().double(), b[k].flatten().double(), dim=0).item()
        for k in a
    )
    for dtype, rel, cos in ((None, 1e-6, 1 - 1e-9), (torch.bfloat16, 2e-3, 0.99)):
        torch.manual_seed(5)
        lp, gp = loss_and_grads(peft_model, padded, autocast_dtype=dtype)
        torch.manual_seed(5)
        lf, gf = loss_and_grads(fused_model, padded, autocast_dtype=dtype)
        assert (
            ran == {"_LinearWithAdapterBackward"} if one_function else "_LinearWithAdapterBackward" not in ran
        )
        ran.clear()
        assert lf == pytest.approx(lp, rel=rel), dtype
        assert gf.keys() == gp.keys() and len(gf) > 0
        assert cosine(gf, gp) > cos, dtype
        if dropout:  # other dropout draws give other gradients (0.76 here): the masks above matched
            torch.manual_seed(6)
            assert cosine(loss_and_grads(fused_model, padded, autocast_dtype=dtype)[1], gf) < 0.95


def test_base_and_adapter_in_one_function_are_as_exact_as_the_separate_path():
    """One layer (the MLP's down projection, unquantized) with base and adapter in one Function against the
    separate path (base, adapter, autograd's sum), both against fp64: output and every gradient, in fp32 and
    in bf16, where summing the input gradients in the matmul rounds once instead of twice (the GPU test adds
    NF4 and the dropout kernel)."""
    from levers import one_function_accuracy

    _, model = build({"quant.bits": 16}, CPU)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    torch.manual_seed(3)
    x, g = torch.randn(2, 40, layer.in_features), torch.randn(2, 40, layer.out_features)
    for dtype in (torch.float32, torch.bfloat16):
        r = one_function_accuracy(layer, x.to(dtype), g.to(dtype), 0.0)
        assert r["one_function_fn"] == "_LinearWithAdapterBackward" != r["separate_fn"], r
        for name in ("out", "grad_x", "grad_a", "grad_b"):
            ours, theirs = r[f"one_function_{name}_rel_err"], r[f"separate_{name}_rel_err"]
            if dtype == torch.float32:
                assert ours < 1e-6 and theirs < 1e-6, (name, r)
            else:
                assert ours <= max(1.05 * theirs, 1e-3) < 5e-3, (name, r)
        if dtype == torch.bfloat16:
            assert r["one_function_grad_x_rel_err"] < 0.9 * r["separate_grad_x_rel_err"], r


@pytest.mark.slow
@pytest.mark.parametrize("every", [None, 2])
def test_selective_recompute_redraws_the_dropout_masks_and_keeps_less(every):
    """parallel.activation_checkpointing=selective (and `true` in the layers it leaves whole): every adapter
    draws its dropout mask again in backward instead of keeping it with a dropped copy of its input. The loss
    and gradients are bit-identical to keeping them (fp32 and bf16 autocast), and dropout then costs the
    layers no more activation memory than no dropout."""
    from shardtune.kernels.fused_lora import FusedLinear
    from shardtune.planning.activations import saved_bytes

    if every:  # `true`: every 2nd layer recomputed whole, the others redraw their masks
        ac = {"parallel.activation_checkpointing": True, "parallel.checkpoint_every": every}
    else:
        ac = {"parallel.activation_checkpointing": "selective"}
    _, kept = build({"lora.dropout": 0.1}, CPU)  # no recomputation: masks and dropped copies kept
    _, replayed = build({"lora.dropout": 0.1, **ac}, CPU)
    layers = replayed.base_model.model.model.layers
    flags = [{m.replay_dropout for m in layer.modules() if isinstance(m, FusedLinear)} for layer in layers]
    # a recomputed layer keeps nothing between forward and backward: it keeps its masks while it recomputes
    assert flags == [{False} if every and i % every == 0 else {True} for i in range(len(layers))]
    assert not any(m.replay_dropout for m in kept.modules() if isinstance(m, FusedLinear))
    padded, _ = batches(LENGTHS, 384, 2, CPU)
    kept.train(), replayed.train()
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(5)
        lk, gk = loss_and_grads(kept, padded, autocast_dtype=dtype)
        after_kept = torch.rand(1)
        torch.manual_seed(5)
        lr, gr = loss_and_grads(replayed, padded, autocast_dtype=dtype)
        assert lr == lk and torch.rand(1) == after_kept, dtype  # same draws, and the generator left as it was
        for name in gk:
            torch.testing.assert_close(gr[name], gk[name], rtol=0, atol=0)
        torch.manual_seed(6)  # other draws, other gradients: the masks above were drawn again, not zeros
        other = loss_and_grads(replayed, padded, autocast_dtype=dtype)[1]
        assert any(not torch.equal(other[n], gr[n]) for n in gr)
    if every:
        return
    _, no_dropout = build({"lora.dropout": 0.0}, CPU)

    def kept_bytes(model):
        inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        return saved_bytes(lambda: model(**inputs, use_cache=False), list(model.parameters()))

    assert kept_bytes(replayed) == kept_bytes(no_dropout) < kept_bytes(kept)


def test_fused_lora_is_refused_under_deepspeed_and_auto_turns_it_off():
    from shardtune.model.modeling import lora_fused

    cfg = apply_overrides(Config(), {"parallel.backend": "deepspeed"}, "test")
    assert cfg.lora.fused == "auto" and not lora_fused(cfg)
    assert lora_fused(Config())
    with pytest.raises(ConfigError, match=r"lora\.fused=true does not work with parallel\.backend=deepspeed"):
        apply_overrides(Config(), {"parallel.backend": "deepspeed", "lora.fused": "true"}, "test")


@pytest.mark.slow
def test_checkpointing_every_kth_layer_recomputes_those_layers_exactly():
    layers = model_config(Config()).num_hidden_layers
    n_all, (loss_all, g_all) = _count_checkpointed(1)
    n_half, (loss_half, g_half) = _count_checkpointed(2)
    assert (n_all, n_half) == (layers, len(range(0, layers, 2)))
    assert loss_half == loss_all
    for name in g_all:
        torch.testing.assert_close(g_half[name], g_all[name], rtol=0, atol=0)


def test_auto_checkpointing_picks_the_fastest_plan_that_fits():
    """Offloading or recomputing more layers plans less memory; auto takes, at each budget, the fastest planned
    choice that fits it (offloading where its copies hide behind the compute, recomputing where they would
    not or where only recomputation fits, a mix of both in between)."""
    cfg = apply_overrides(
        Config(),
        {
            "model.name_or_path": "llama3-8b",
            "parallel.mixed_precision": "bf16",
            "data.max_len": 4096,
            "train.micro_batch_size": 2,
            "train.global_batch_size": 4,
            "parallel.activation_checkpointing": "auto",
            "eval.batch_size": 1,
            "lora.dropout": 0.05,
        },
        "test",
    )
    hf_config = model_config(cfg)
    plans = {}
    for ac, every in CHECKPOINT_CHOICES:
        choice = {"parallel.activation_checkpointing": ac, "parallel.checkpoint_every": every}
        plans[(ac, every)] = estimate(apply_overrides(cfg, choice, "test"), hf_config, 2)
    for mode in ("offload", True):  # every 4th, 3rd, 2nd, every layer: less memory each time
        peaks = [plans[c].gpu_peak for c in CHECKPOINT_CHOICES if c[0] == mode]
        assert all(a > b for a, b in itertools.pairwise(peaks)) and peaks[0] < plans[(False, 1)].gpu_peak
    chosen = set()
    for target in CHECKPOINT_CHOICES:
        mem = plans[target].gpu_peak / AUTO_MARGIN * 1.001  # just enough for this choice
        fitting = [c for c in CHECKPOINT_CHOICES if plans[c].gpu_peak <= AUTO_MARGIN * mem]
        fastest = min(fitting, key=lambda c: plans[c].step_s)
        choice, _ = choose_auto(cfg, hf_config, 2, mem)
        assert (choice["parallel.activation_checkpointing"], choice["parallel.checkpoint_every"]) == fastest
        chosen.add(fastest)
    kinds = {c[0] if c[0] in (False, "offload", True) else "mix" for c in chosen}
    assert kinds == {False, "offload", "mix", True}, chosen  # each kind wins somewhere
    choice, _ = choose_auto(cfg, hf_config, 2, None)  # no GPU: nothing to save
    assert choice["parallel.activation_checkpointing"] is False


def test_fused_kernels_are_refused_on_the_cpu_and_auto_turns_them_off():
    cfg = apply_overrides(Config(), {"model.fused_kernels": True}, "test")
    with pytest.raises(
        ConfigError, match=r"model\.fused_kernels=true: .*CPU.*Set model\.fused_kernels=auto or false"
    ):
        fused_kernels(cfg, model_config(cfg), "cpu")
    assert Config().model.fused_kernels == "auto"
    assert fused_kernels(Config(), model_config(Config()), "cpu") is False
    assert fused_kernels(apply_overrides(cfg, {"model.fused_kernels": False}, "t"), None, "cuda") is False


@pytest.mark.slow
def test_shardtune_bench_prints_one_json_line_per_run(tmp_path):
    import subprocess

    def bench(*args):
        proc = subprocess.run(
            [
                str(BIN / "shardtune"),
                "bench",
                "tiny",
                "--gpus",
                "2",
                "--warmup",
                "1",
                "--steps",
                "2",
                "--workdir",
                str(tmp_path),
                *args,
            ],
            cwd=ROOT,
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    fixed = bench("--seq", "96", "--micro-batch", "2", "parallel.activation_checkpointing=false")
    assert fixed["tokens_per_step"] == 96 * 2 * 2  # every row exactly --seq tokens
    assert fixed["measured_steps"] == 2 and fixed["tokens_per_s_per_gpu"] > 0
    assert 0 < fixed["mfu"] == fixed["hfu"]  # nothing recomputed
    assert fixed["settings"]["activation_checkpointing"] is False and fixed["settings"]["lora"]["r"] == 16
    assert fixed["settings"]["fused_kernels"] is False  # auto, on a CPU
    varied = bench("--seq", "256", "--micro-batch", "4", "--lengths", "instruct", "data.packing=true")
    assert varied["settings"]["packing"] is True and varied["hfu"] > varied["mfu"]  # recipe checkpoints
    assert varied["tokens_per_step"] < 256 * 4 * 2  # real tokens only


def test_bench_rates_are_all_tokens_over_all_time(tmp_path):
    """A padded variable-length run has short and long steps; its tokens/s and MFU are the measured steps' work
    over their time, not the mean of per-step rates (which counts the 1 s step as much as the 3 s one)."""
    from shardtune.cli.bench import summarize
    from shardtune.config import to_yaml

    # (tokens, seconds) on 2 GPUs: a warm-up step, then 4,000 tokens in 1 s and 4,000 in 3 s
    steps = [(100, 10.0), (4000, 1.0), (4000, 3.0)]
    lines = [
        {
            "step": i + 1,
            "loss": 1.0,
            "step_time_s": t,
            "tokens": n,
            "tokens_per_s_per_device": n / t / 2,
            "mfu": 1e-4 * n / t,
            "hfu": 2e-4 * n / t,
        }
        for i, (n, t) in enumerate(steps)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "config.yaml").write_text(to_yaml(Config()))
    got = summarize(tmp_path, warmup=1)
    assert got["tokens_per_s_per_gpu"] == 1000.0  # 8,000 tokens / 4 s / 2 GPUs (the mean of rates: 1,333.3)
    assert got["mfu"] == 0.2 and got["hfu"] == 0.4
    assert got["step_s"] == 2.0 and got["tokens_per_step"] == 4000 and got["step_s_each"] == [1.0, 3.0]


@pytest.mark.slow
def test_bench_refuses_a_typo_before_starting(tmp_path):
    import subprocess

    proc = subprocess.run(
        [str(BIN / "shardtune"), "bench", "tiny", "data.pakcing=true", "--workdir", str(tmp_path)],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "data.packing" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_training_loop_runs_with_the_long_lived_objects_frozen(tmp_path):
    """Before its loop a run freezes what lives as long as it does (the libraries, the model, the data) out of
    the garbage collector's sight, so that a full collection during a step walks only what the loop made (on
    one H200 such a collection took 0.5 s over them; bench/results/2026-12-02-1xh200-gc). Once a run has
    returned they are unfrozen and its model freed before a sweep's next run builds its own (its modules are
    held in reference cycles, which only a collection frees), and nothing is left frozen for the caller."""
    run = ["recipes/tiny.py", "train.max_steps=2", "eval.samples=0", f"train.output_dir={tmp_path}"]
    # three runs: without a collection after each, the second's parameters outlived the third's build
    sweep = ["--sweep", "lora.r=4,8,16"]
    proc = launch(["tests/workers/gc_frozen.py", *run, *sweep], nproc=1, launcher="python")
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(seen["steps"]) == 6 and len(seen["builds"]) == 3
    for step in seen["steps"]:
        assert step["frozen"] > 200_000 and step["tracked"] < 10_000, step  # unfrozen: ~94k tracked (tiny)
    assert [b["previous_params_alive"] for b in seen["builds"]] == [0, 0, 0], seen["builds"]
    assert seen["after"]["frozen"] == 0 and seen["after"]["tracked"] > 200_000, seen
