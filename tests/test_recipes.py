"""Every bundled recipe and accelerate config loads and validates; the three workflows this project grew
from run as recipes, on local sample files in their datasets' schema, with a tiny model in their place."""

import http.server
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, launch, read_summary, run_env
from samples import alpaca_cleaned, no_robots, product_descriptions, ultrafeedback_binarized
from shardtune.cli.args import resolve_config
from shardtune.errors import ConfigError

RECIPES = sorted((ROOT / "recipes").glob("*.py"))
CONFIGS = sorted((ROOT / "fsdp_configs").glob("*.yaml"))
# Replace the recipe's hub model by the tiny one (and its learning rate by one for a tiny random model);
# everything else stays the recipe's.
TINY = [
    "model.name_or_path=tiny",
    "model.init=random",
    "train.max_steps=6",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "eval.every=3",
    "eval.batch_size=2",
    "eval.samples=2",
    "eval.max_new_tokens=8",
    "data.max_len=192",
    "optim.lr=3e-3",
    "optim.warmup_steps=0",
]


def launch_info(path: str | Path) -> dict:
    """Process layout an accelerate config asks for (the bundled configs are checked against it)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(path))
    return {
        "num_processes": cluster.num_processes,
        "num_machines": cluster.num_machines,
        "distributed_type": str(cluster.distributed_type).split(".")[-1],
    }


def load_recipe(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_and_configs_are_all_there():
    assert {p.stem for p in RECIPES} >= {
        "tiny",
        "tiny_dpo",
        "llama3_8b",
        "llama3_8b_dpo",
        "llama3_70b",
        "product_descriptions",
    }
    assert {p.stem for p in CONFIGS} >= {
        "cpu_2proc",
        "4xa10g",
        "2xh100",
        "8xh100",
        "multinode",
        "zero3_2xh100",
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("hardware", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_validates_with_every_config(recipe, hardware):
    # (an adapter to start from is a run's output, absent here: test_a_recipes_missing_starting_adapter_...)
    base, overrides = (
        load_recipe(recipe).config(),
        [f"parallel.launch_config={hardware}", "model.adapter=null"],
    )
    if base.optim.name != "adamw" and launch_info(hardware)["distributed_type"] == "DEEPSPEED":
        # bitsandbytes' optimizers (llama3_8b.py's) are refused under ZeRO-3, with the fix
        with pytest.raises(ConfigError, match=r"deepspeed.*set optim\.name=adamw"):
            resolve_config(base, overrides, env={})
        overrides.append("optim.name=adamw")
    cfg = resolve_config(base, overrides, env={})
    assert cfg.parallel.wrap_class == "LlamaDecoderLayer"
    assert cfg.storage_dtype == cfg.param_dtype


def test_config_process_layouts():
    layouts = {p.stem: launch_info(p) for p in CONFIGS}
    assert layouts["cpu_2proc"]["num_processes"] == 2 and layouts["4xa10g"]["num_processes"] == 4
    assert layouts["2xh100"]["num_processes"] == 2 and layouts["8xh100"]["num_processes"] == 8
    assert layouts["multinode"]["num_machines"] == 2 and layouts["multinode"]["num_processes"] == 16
    assert layouts["zero3_2xh100"]["num_processes"] == 2 and layouts["zero3_4xa10g"]["num_processes"] == 4
    deepspeed = {name for name, layout in layouts.items() if layout["distributed_type"] == "DEEPSPEED"}
    assert deepspeed == {"zero3_cpu_2proc", "zero3_2xh100", "zero3_4xa10g"}
    assert all(layouts[name]["distributed_type"] == "FSDP" for name in layouts.keys() - deepspeed)


@pytest.mark.slow
def test_recipe_command_line(tmp_path):
    run = [sys.executable, "recipes/llama3_70b.py"]
    ok = subprocess.run([*run, "--validate", "lora.r=8"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "configuration is valid" in ok.stdout
    bad = subprocess.run([*run, "--validate", "lora.rank=8"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "Did you mean 'lora.r'" in bad.stderr
    shown = subprocess.run([*run, "--print-config"], cwd=ROOT, capture_output=True, text=True)
    assert "name_or_path: meta-llama/Meta-Llama-3-70B" in shown.stdout
    helped = subprocess.run([*run, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "data.chat_template='human_assistant'" in helped.stdout and "LoRA rank." in helped.stdout


def test_a_recipes_missing_starting_adapter_is_refused_with_the_fix(tmp_path):
    """llama3_8b_dpo.py starts from what llama3_8b.py leaves (runs/llama3_8b/adapter): without it, exit 2 naming
    the setting, before anything loads."""
    run = [sys.executable, str(ROOT / "recipes" / "llama3_8b_dpo.py"), "--validate"]
    proc = subprocess.run(run, cwd=tmp_path, env=run_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "model.adapter=runs/llama3_8b/adapter: no such directory" in proc.stderr
    assert "model.adapter=null to start from PEFT's initialization" in proc.stderr


@pytest.mark.slow
def test_a_batch_size_that_does_not_divide_stops_the_run_before_the_model_loads(tmp_path):
    """The processes can only be counted at launch: the run checks the batch sizes right after the data, before
    any weight is read or drawn, and says what to change."""
    batch = ["train.global_batch_size=30", "train.micro_batch_size=4"]
    proc = subprocess.run(
        [sys.executable, "recipes/tiny.py", *batch, f"train.output_dir={tmp_path}"],
        cwd=ROOT,
        env=run_env(),  # no process-group variables left by an earlier in-process test
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "error: train.global_batch_size=30 is not a multiple of train.micro_batch_size=4 x 1 processes"
        in (proc.stderr)
    )
    assert "[shardtune] model:" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def hub_answering(tmp_path):
    """A local HTTP server standing in for the Hugging Face Hub (HF_ENDPOINT) that answers every request with
    one status code (and the hub's X-Error-Code header, if given); yields a function of those to the environment
    that points a run at it."""
    servers = []

    def start(code: int, error_code: str = "") -> dict[str, str]:
        class Answer(http.server.BaseHTTPRequestHandler):
            def answer(self):
                self.send_response(code)
                self.send_header("Retry-After", "0")  # huggingface_hub's retries then wait 1 s, not up to 8
                self.send_header("Content-Length", "0")
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.end_headers()

            do_GET = do_HEAD = answer

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        # an empty cache of its own: a copy of the dataset cached on this machine would be used instead
        return run_env(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HOME=str(tmp_path / "hf"))

    yield start
    for server in servers:
        server.shutdown()


HUB_DATA = ["recipes/llama3_8b.py", "data.pad_token=null", *TINY]  # yahma/alpaca-cleaned, a tiny model
HUB_MODEL = ["recipes/tiny.py", "model.name_or_path=meta-llama/Meta-Llama-3-8X"]  # the generated task


@pytest.mark.parametrize(
    ("run", "answer", "env", "exit_code", "input_error", "said"),
    [
        (HUB_DATA, (503,), {}, 1, False, "'yahma/alpaca-cleaned' (split 'train') on the Hugging Face Hub (and no "
         "local folder has that name): HTTP 503. A network or hub outage: a restart retries it"),
        (HUB_DATA, (404,), {}, 2, True, "the hub answered HTTP 404.) Without hub access, point data.source at"),
        (HUB_DATA, (503,), {"HF_HUB_OFFLINE": "1"}, 2, True, "(offline mode is on (HF_HUB_OFFLINE or"),
        (HUB_MODEL, (401, "RepoNotFound"), {}, 2, True, "error: model.name_or_path=meta-llama/Meta-Llama-3-8X: "
         "no such repository on the hub, or a private one this user cannot read (`hf auth login`)"),
        (HUB_MODEL, (403, "GatedRepo"), {}, 2, True, "Meta-Llama-3-8X: a gated repository this user has no access"),
        (HUB_MODEL, (503,), {}, 1, False, "couldn't connect to 'http://127.0.0.1:"),
        (HUB_MODEL, (503,), {"HF_HUB_OFFLINE": "1"}, 2, True, "Meta-Llama-3-8X: offline mode is on"),
    ],
    ids=[
        "data-hub-down", "no-such-dataset", "data-offline",
        "no-such-model", "gated-model", "model-hub-down", "model-offline",
    ],
)  # fmt: skip
@pytest.mark.slow
def test_a_hub_outage_is_retried_and_a_refusal_is_an_input_error(
    tmp_path, hub_answering, run, answer, env, exit_code, input_error, said
):
    """A recipe whose dataset or model the hub does not give: an outage (HTTP 503) exits 1, which launchers
    restart, and status.json does not call it an input error, so `shardtune submit` requeues it; a dataset or a
    model the hub does not have or lets no one read, and offline mode without it in the cache, are input errors
    (exit 2, the setting named): they fail the same way on every start. transformers and datasets raise the same
    OSError / FileNotFoundError for both; the HTTP error under it tells them apart."""
    proc = subprocess.run(
        [sys.executable, *run, f"train.output_dir={tmp_path}", "train.run_name=run"],
        cwd=ROOT,
        env={**hub_answering(*answer), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == exit_code, proc.stderr[-3000:]
    assert said in proc.stderr, proc.stderr[-3000:]
    assert "[shardtune] model:" not in proc.stderr  # found before the model was built
    assert "HTTP Request:" not in proc.stderr  # the HTTP client's line per request stays out of the log
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and status["input_error"] is input_error


@pytest.mark.slow
def test_product_descriptions_sweep(tmp_path):
    """The recipe's own grid, attention-only / all linear layers x a 4-bit / an 8-bit base, on 2 CPU processes:
    four runs in one table with the base model's samples score (the adapters off) beside the tuned model's; each
    run prints and writes what the base and the tuned model wrote for the same held-out products. The 8-bit runs
    keep the whole base on each process (FSDP cannot shard int8)."""
    data = product_descriptions(tmp_path / "red_dot.csv")
    proc = launch(
        [
            "recipes/product_descriptions.py",
            "--sweep",
            f"data.source={data}",
            f"train.output_dir={tmp_path}",
            *TINY,
        ]
    )
    rows = json.loads((tmp_path / "product_descriptions" / "sweep" / "summary.json").read_text())
    assert len(rows) == 4
    status = json.loads((tmp_path / "product_descriptions" / "status.json").read_text())
    assert status["status"] == "complete" and status["runs"] == 4  # what slurm/train.sh reads
    runs = {(r["quant.bits"], str(r["lora.target_modules"])): r for r in rows}
    attention_only = "['q_proj', 'v_proj']"
    for bits in (4, 8):
        assert (
            runs[(bits, attention_only)]["trainable_params"] < runs[(bits, "all-linear")]["trainable_params"]
        )
    assert runs[(4, "all-linear")]["trainable_params"] == runs[(8, "all-linear")]["trainable_params"]
    assert all(r["final_eval_loss"] < r["first_eval_loss"] for r in rows)
    for (bits, _), r in runs.items():  # FSDP shards the 4-bit base; the 8-bit one is whole on each process
        assert (
            (r["sharding_strategy"], r["rank0_holds"]) == ("NO_SHARD", 1.0)
            if bits == 8
            else r["rank0_holds"] < 0.6
        )
    table = (tmp_path / "product_descriptions" / "sweep" / "summary.md").read_text()
    head = table.splitlines()[0]
    assert (
        "quant.bits" in head
        and "trainable params" in head
        and "eval loss end" in table
        and table.count("\n") == 6
    )
    # descriptions are free text: scored by ROUGE-L, not exact match, the base model's and the tuned one's
    assert "| base ROUGE-L | ROUGE-L" in head and all(r["sample_metric"] == "rouge_l" for r in rows)
    assert all(
        0 <= r["rouge_l"] <= 1 and 0 <= r["base_rouge_l"] <= 1 and r["exact_match"] is None for r in rows
    )
    assert table in proc.stdout  # printed at the end of the sweep
    samples = [
        json.loads(x) for x in (Path(rows[0]["run_dir"]) / "generations.jsonl").read_text().splitlines()
    ]
    assert "belonging to category:" in samples[0]["prompt"] and samples[0]["reference"].endswith("### End")
    base = {r["prompt"]: r for r in samples if r["adapter"] == "off"}
    tuned = {r["prompt"]: r for r in samples if r["adapter"] == "on" and r["step"] == 6}
    assert base.keys() == tuned.keys() and len(base) == 2 and {r["step"] for r in base.values()} == {0}
    assert {r["step"] for r in samples if r["adapter"] == "on"} == {3, 6}  # eval.every=3, and the end
    assert proc.stdout.count("    base : ") == proc.stdout.count("    tuned: ") == 4 * 2


@pytest.mark.slow
def test_llama3_8b_alpaca_cleaned(tmp_path):
    data = alpaca_cleaned(tmp_path / "alpaca.jsonl")
    proc = launch(
        [
            "recipes/llama3_8b.py",
            f"data.source={data}",
            f"train.output_dir={tmp_path}",
            "data.pad_token=null",
            "data.test_size=4",
            *TINY,
        ]
    )
    run = tmp_path / "llama3_8b"
    summary = read_summary(run)
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    assert "60 train rows, 4 eval rows" in proc.stderr
    # the recipe's own GPU settings ran on CPU: bf16, checkpointing, packed rows (Liger 'auto': off on a CPU)
    cfg = (run / "config.yaml").read_text()
    assert (
        "activation_checkpointing: true" in cfg and "mixed_precision: bf16" in cfg and "packing: true" in cfg
    )
    assert (
        "name: adamw_8bit" in cfg and "scheduler: constant_with_warmup" in cfg
    )  # bitsandbytes' runs on a CPU
    assert summary["fused_kernels"] is False
    answers = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert next(a["question"] for a in answers if "question" in a) == "What is the capital of France?"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_llama3_8b_dpo_ultrafeedback_from_an_sft_adapter(tiny_run, tmp_path):
    """The 8B DPO recipe as written, on local rows in ultrafeedback_binarized's schema (its text prompt, chosen and
    rejected conversations, messages, scores; splits train_prefs/test_prefs), the tiny model in Llama-3-8B's
    place and the SFT demo's adapter (its LoRA settings are the recipe's) to start from."""
    data = ultrafeedback_binarized(tmp_path / "ultrafeedback")
    sft, _ = tiny_run
    proc = launch(
        [
            "recipes/llama3_8b_dpo.py",
            f"data.source={data}",
            f"model.adapter={sft / 'adapter'}",
            f"train.output_dir={tmp_path}",
            "data.pad_token=null",
            *TINY,
        ],
        launcher="accelerate",
    )
    run = tmp_path / "llama3_8b_dpo"
    summary = read_summary(run)
    assert summary["objective"] == "dpo" and summary["world_size"] == 2
    assert "format preference: 48 train rows, 8 eval rows" in proc.stderr
    # started from the SFT adapter, which is then DPO's reference too: at the start the policy is its reference
    assert summary["reference"] == "adapter" and "the reference is the starting adapter" in proc.stderr
    assert summary["first_eval"]["eval_rewards/margins"] == 0
    assert summary["final_eval"]["eval_pairs"] == 8
    cfg = (run / "config.yaml").read_text()
    assert "name: dpo" in cfg and "beta: 0.01" in cfg and "packing: true" in cfg
    sample = json.loads((run / "generations.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].endswith("\n\nAssistant: ") and "rejected" in sample


@pytest.mark.slow
def test_llama3_70b_no_robots_chat(tmp_path):
    data = no_robots(tmp_path / "no_robots")
    launch(
        ["recipes/llama3_70b.py", f"data.source={data}", f"train.output_dir={tmp_path}", *TINY],
        launcher="accelerate",
    )
    run = tmp_path / "llama3_70b"
    summary = read_summary(run)
    assert summary["world_size"] == 2 and summary["final_eval_loss"] < summary["first_eval_loss"]
    cfg = (run / "config.yaml").read_text()
    # the hardware config (cpu_2proc.yaml: fp32, no checkpointing) wins over the recipe's GPU settings
    assert "activation_checkpointing: false" in cfg and "mixed_precision: 'no'" in cfg
    sample = json.loads((run / "generations.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].endswith("\n\nAssistant: ")


@pytest.mark.slow
def test_the_4xa10g_command_runs_as_4_processes(tmp_path, capsys):
    """`accelerate launch --config_file fsdp_configs/4xa10g.yaml recipes/llama3_70b.py` as written, on 4 CPU
    processes with the tiny model and local rows in place of the hub's: the launch, the config's settings,
    4-way sharding and the recipe's batch layout (the 4-GPU run itself needs a 4-GPU machine)."""
    from shardtune.cli.main import main as cli

    data = no_robots(tmp_path / "no_robots")
    small = [
        "model.name_or_path=tiny",
        "model.init=random",
        "train.max_steps=2",
        "eval.every=0",
        "eval.samples=0",
        "eval.max_rows=4",
        "data.max_len=192",
    ]
    proc = launch(
        ["recipes/llama3_70b.py", f"data.source={data}", f"train.output_dir={tmp_path}", *small],
        launcher="accelerate",
        nproc=4,
        config="fsdp_configs/4xa10g.yaml",
    )
    summary = read_summary(tmp_path / "llama3_70b")
    assert summary["world_size"] == 4 and 0.2 < summary["rank0_holds"] < 0.3  # a quarter of the base each
    cfg = (tmp_path / "llama3_70b" / "config.yaml").read_text()
    assert (
        "cpu_offload: true" in cfg
        and "activation_checkpointing: true" in cfg
        and "mixed_precision: bf16" in cfg
    )
    log = proc.stdout + proc.stderr
    assert "(2 x 1 rows per process per step)" in log  # global batch 8 = 4 GPUs x 1 row x 2 accumulated
    assert "parallel.cpu_offload is ignored on CPU" in log
    # and the plan for the real thing: 80 layers on 4 x 24 GiB with offload fits
    assert cli(["plan", "recipes/llama3_70b.py", "--gpus", "4", "--gpu-mem", "24GiB", "--gpu", "a10g"]) == 0
    assert "fits in 24 GiB" in capsys.readouterr().out


def test_shardtune_validate_command(capsys):
    from shardtune.cli.main import main

    assert main(["validate", "recipes/llama3_8b.py", "lora.r=8"]) == 0
    assert main(["validate", "recipes/llama3_8b.py", "lora.rk=8"]) == 2
    assert "Did you mean 'lora.r'" in capsys.readouterr().err
    assert main(["validate", "recipes/missing.py"]) == 2


@pytest.mark.slow
def test_accelerate_launch_and_torchrun_resolve_a_silent_yaml_alike(tmp_path):
    """`accelerate launch` exports offload and activation checkpointing as false when its YAML leaves them out;
    llama3_70b.py then keeps its own (true, true) as it does under torchrun with parallel.launch_config, and the
    YAML's fsdp_reshard_after_forward (what `accelerate config` writes) sets the strategy under both."""
    yaml_file = tmp_path / "silent.yaml"
    yaml_file.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\nnum_processes: 1\n"
        "mixed_precision: bf16\nuse_cpu: false\nfsdp_config:\n  fsdp_version: 1\n"
        "  fsdp_reshard_after_forward: NO_SHARD\n  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n"
    )
    recipe = ["recipes/llama3_70b.py", "--print-config"]
    shown = {}
    for name, cmd in (
        ("accelerate", [str(BIN / "accelerate"), "launch", "--config_file", str(yaml_file), *recipe]),
        ("torchrun", [sys.executable, *recipe, f"parallel.launch_config={yaml_file}"]),
    ):
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        shown[name] = yaml.safe_load(proc.stdout)["parallel"]
    assert shown["torchrun"].pop("launch_config") == str(yaml_file)
    assert shown["accelerate"].pop("launch_config") is None
    assert shown["accelerate"] == shown["torchrun"]
    assert (
        shown["accelerate"]["cpu_offload"] is True and shown["accelerate"]["activation_checkpointing"] is True
    )
    assert shown["accelerate"]["sharding_strategy"] == "NO_SHARD"
