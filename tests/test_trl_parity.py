"""shardtune's DPO and ORPO against TRL's own trainers (trl 1.16: DPOTrainer, and ORPOTrainer from
trl.experimental.orpo), fp32 on the CPU: the same tiny Llama and tokenizer, the same four pairs, beta and
adapter initialization (TRL's, handed to shardtune through model.adapter). The first step's loss and rewards
agree within 1e-5 relative, the LoRA gradients within 1e-4 (per tensor, ||ours - TRL|| / ||TRL||).

shardtune runs as a run does (data from a file, the model built layer by layer with the adapter loaded, the
objective, the step), in this process at world size 1 (FSDP's path for one process: the plain module).
Skipped where trl is not installed (it is in the dev extra)."""

from __future__ import annotations

import json
import os

import pytest
import torch

trl = pytest.importorskip("trl")

from shardtune.config import Config  # noqa: E402
from shardtune.config.checks import LLAMA_LINEAR_NAMES  # noqa: E402
from shardtune.parallel.distributed import init_distributed, teardown  # noqa: E402
from shardtune.train.run import Run  # noqa: E402

PAIRS = [
    {"prompt": "Question: what is two plus two?\nAnswer:", "chosen": " four", "rejected": " five, probably"},
    {"prompt": "Reverse the letters a b c.\n", "chosen": "c b a", "rejected": "a b c"},
    {"prompt": "Name a colour of the sky.", "chosen": " Blue.", "rejected": " The sky is green and red."},
    {"prompt": "Sort: 3 1 2\n", "chosen": "1 2 3", "rejected": "3 2 1 0"},
]
HELD_OUT = [{"prompt": "Sort: b a\n", "chosen": "a b", "rejected": "b a"}]
BETA = 0.1
COMMON = dict(  # every TrainingArguments setting that matters for one deterministic, comparable step
    per_device_train_batch_size=4,  # all four pairs in one micro-batch
    gradient_accumulation_steps=1,
    max_steps=1,
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=0.0,  # no clipping: the gradients seen before the optimizer step are raw
    bf16=False,  # TRL's configs default to bf16 (CPU autocast)
    fp16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    disable_dropout=True,
    dataloader_num_workers=0,
    seed=42,
    data_seed=42,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    disable_tqdm=True,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama and a tokenizer that puts BOS in front (as Llama's do), written as a checkpoint."""
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.model.tokenizer import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("parity")
    tok = build_tiny_tokenizer()
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(hf_config).float().save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    for name, rows in (("train.jsonl", PAIRS), ("eval.jsonl", HELD_OUT)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


class GradCapture:
    """A TrainerCallback keeping the gradients the first optimizer step is about to use."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Capture(TrainerCallback):
            grads: dict | None = None

            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                self.grads = self.grads or {
                    n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
                }

        return Capture()


def trl_first_step(base, name: str) -> dict:
    """TRL's trainer for one step on the bare base with a peft_config (the reference then being the base with
    the adapter off); its initial adapter saved for shardtune, the first step's loss, metrics and gradients."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRL_EXPERIMENTAL_SILENCE="1")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(base / "base")
    model = LlamaForCausalLM.from_pretrained(base / "base", dtype=torch.float32, attn_implementation="eager")
    lora = LoraConfig(  # A and B both random: with PEFT's B = 0 the first step is trivial (loss ln 2)
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LLAMA_LINEAR_NAMES), init_lora_weights=False
    )
    grads, first = GradCapture(), {}
    if name == "dpo":
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                first.setdefault("loss", loss.item())
                first.setdefault("metrics", {k: v[-1] for k, v in self._metrics["train"].items()})
                return loss

        args = DPOConfig(
            output_dir=str(base / "trl"), beta=BETA, loss_type=["sigmoid"], max_length=1024, **COMMON
        )
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        class Trainer(ORPOTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                first.setdefault("loss", loss.item())
                first.setdefault("metrics", {k: v[-1] for k, v in self._stored_metrics["train"].items()})
                return loss

        args = ORPOConfig(output_dir=str(base / "trl"), beta=BETA, max_length=1024, **COMMON)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tok,
        peft_config=lora,
        callbacks=[grads],
    )
    adapter = base / f"trl-{name}-initial-adapter"
    trainer.model.save_pretrained(adapter)  # before training: the adapter shardtune starts from
    rows = trainer.train_dataset
    if name == "dpo":
        sequences = [r["prompt_ids"] + r[k] for k in ("chosen_ids", "rejected_ids") for r in rows]
    else:
        sequences = [r[k] for k in ("chosen_input_ids", "rejected_input_ids") for r in rows]
    trainer.train()
    return {**first, "grads": grads.grads, "adapter": adapter, "sequences": sequences}


def shardtune_first_step(base, name: str, adapter, steps: int = 1, **objective) -> dict:
    """shardtune's run on the same base, rows and starting adapter, for `steps` steps (TRL's optimizer settings):
    the first step's metrics and gradients, and every step's metrics."""
    overrides = {
        "model.name_or_path": str(base / "base"),
        "model.init": "pretrained",
        "model.attn_implementation": "eager",
        "model.adapter": str(adapter),
        "quant.bits": "16",
        "lora.r": "8",
        "lora.alpha": "16",
        "lora.target_modules": f"[{','.join(LLAMA_LINEAR_NAMES)}]",
        "data.source": str(base / "train.jsonl"),
        "data.eval_source": str(base / "eval.jsonl"),
        "data.max_len": "1024",
        "objective.name": name,
        "objective.beta": str(BETA),
        "train.global_batch_size": "4",
        "train.micro_batch_size": "4",
        "train.max_steps": str(steps),
        "train.max_grad_norm": "null",
        "optim.lr": str(COMMON["learning_rate"]),
        "optim.scheduler": "constant",
        "train.output_dir": str(base / "runs"),
        "train.run_name": f"{name}-{len(list((base).glob('runs/*')))}",
        "optim.warmup_steps": "0",
        "eval.samples": "0",
        **{f"objective.{k}": str(v) for k, v in objective.items()},
    }
    from shardtune.cli.args import resolve_config

    cfg = resolve_config(Config(), [f"{k}={v}" for k, v in overrides.items()], env={})
    environ = dict(os.environ)
    try:
        return _steps(cfg, steps)
    finally:  # a group of one, gone again (TRL's accelerate must not find it, nor its variables)
        teardown()
        os.environ.clear()
        os.environ.update(environ)


def _steps(cfg, steps: int) -> dict:
    run = Run(cfg, init_distributed("cpu"), "parity")
    run.start()
    run.prepare_data()
    run.build()
    run.make_step()
    grads: list[dict] = []
    step = run.backend.step

    def captured():
        module = run.backend.unwrap()
        grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})
        return step()

    run.backend.step = captured
    metrics = [run.step(i) for i in range(steps)]
    train = run.data.train
    sequences = [train.sequence(2 * i + k)[0].tolist() for k in (0, 1) for i in range(len(train))]
    return {"metrics": metrics[0], "steps": metrics, "grads": grads[0], "sequences": sequences}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def grad_errors(ours: dict, theirs: dict) -> dict[str, float]:
    assert ours.keys() == theirs.keys() and len(theirs) == 2 * 7 * 2
    return {k: float((ours[k] - theirs[k]).norm() / theirs[k].norm()) for k in theirs}


@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_the_first_step_equals_trls(base, name):
    trl_run = trl_first_step(base, name)
    # TRL's ORPO NLL reads the prompt too; its DPO from a fresh peft_config is against the base
    extra = {"nll_on_prompt": "true"} if name == "orpo" else {"reference": "base"}
    ours = shardtune_first_step(base, name, trl_run["adapter"], **extra)
    assert sorted(ours["sequences"]) == sorted(
        trl_run["sequences"]
    )  # the same token ids, BOS and EOS included
    m, theirs = ours["metrics"], trl_run["metrics"]
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    keys += ["nll_loss", "log_odds_ratio", "log_odds_chosen"] if name == "orpo" else []
    errors = {"loss": rel(m["loss"], trl_run["loss"]), **{k: rel(m[k], theirs[k]) for k in keys}}
    print(name, json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))
    assert max(errors.values()) < 1e-5, errors
    assert m["rewards/accuracies"] == pytest.approx(theirs["rewards/accuracies"])
    grads = grad_errors(ours["grads"], trl_run["grads"])
    print(name, f"max LoRA gradient error {max(grads.values()):.1e}")
    assert max(grads.values()) < 1e-4, grads


def test_label_smoothing_is_cdpo_and_zero_is_trls_sigmoid(base):
    """objective.label_smoothing=e is conservative DPO: -(1-e) log s(d) - e log s(-d) per pair, d = beta D. TRL
    1.16's sigmoid ignores its label_smoothing, so e > 0 is checked against the formula: since -log s(-d) =
    -log s(d) + d, the mean over pairs is TRL's e = 0 loss plus e times the mean margin (rewards/margins)."""
    trl_run = trl_first_step(base, "dpo")
    plain = shardtune_first_step(base, "dpo", trl_run["adapter"], reference="base")["metrics"]
    smoothed = shardtune_first_step(base, "dpo", trl_run["adapter"], reference="base", label_smoothing=0.1)[
        "metrics"
    ]
    assert plain["loss"] == pytest.approx(trl_run["loss"], rel=1e-5)
    assert smoothed["rewards/margins"] == pytest.approx(plain["rewards/margins"], rel=1e-6)
    expected = trl_run["loss"] + 0.1 * trl_run["metrics"]["rewards/margins"]
    print(f"cDPO e=0.1: {smoothed['loss']:.8f} against the formula's {expected:.8f}")
    assert smoothed["loss"] == pytest.approx(expected, rel=1e-5)


def trl_from_an_adapter(base, adapter, steps: int) -> dict:
    """TRL's DPOTrainer on a PeftModel that already has an adapter (`adapter`, trainable): TRL then adds a frozen
    copy of it as the reference ("ref"). Every step's loss and metrics, and the first step's gradients."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(base / "base")
    model = LlamaForCausalLM.from_pretrained(base / "base", dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    grads, seen = GradCapture(), []

    class Trainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.append({"loss": loss.item(), **{k: v[-1] for k, v in self._metrics["train"].items()}})
            return loss

    args = DPOConfig(
        output_dir=str(base / "trl-ref"),
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=1024,
        **{**COMMON, "max_steps": steps},
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=tok,
        callbacks=[grads],
    )
    assert "ref" in trainer.model.peft_config  # the frozen copy TRL measures against
    trainer.train()
    return {"steps": seen, "grads": grads.grads}


def test_dpo_from_an_adapter_is_trls_against_its_frozen_copy(base):
    """model.adapter set, objective.reference=auto: the reference is the adapter as it starts, as TRL's is for a
    model that has one. The first step's policy is its reference (rewards 0, loss ln 2) with TRL's gradients;
    after a step (lr 1e-3) the reference has stayed where it started: the second step's loss, rewards and
    log-probs are TRL's."""
    trl_run = trl_first_step(base, "dpo")  # (its starting adapter: random A and B)
    theirs = trl_from_an_adapter(base, trl_run["adapter"], steps=2)
    ours = shardtune_first_step(base, "dpo", trl_run["adapter"], steps=2)
    first, second = ours["steps"]
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(theirs["steps"][0]["loss"], rel=1e-6)
    grads = grad_errors(ours["grads"], {k: v for k, v in theirs["grads"].items() if ".ref." not in k})
    print(f"max LoRA gradient error {max(grads.values()):.1e}")
    assert max(grads.values()) < 1e-4, grads
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    errors = {k: rel(second[k], theirs["steps"][1][k]) for k in keys}
    print("second step", json.dumps({k: f"{v:.1e}" for k, v in errors.items()}))
    assert abs(second["rewards/margins"]) > 1e-3  # the policy moved: a reference that followed it gives 0
    assert max(errors.values()) < 1e-5, errors
