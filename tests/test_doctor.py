"""`shardtune doctor` and `--doctor`: each finding says what is wrong and what to change."""

import json
import subprocess
import sys

import pytest

from conftest import BIN, ROOT, run_env
from shardtune.cli.doctor import logged_save_seconds, signal_lead
from shardtune.cli.main import main as cli


def test_a_good_setup_passes(capsys, tmp_path):
    assert cli(["doctor", "recipes/tiny.py", f"train.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "torch ",
        "bitsandbytes 4-bit round trip on cpu",
        "FSDP wraps LlamaDecoderLayer",
        "attention: sdpa",
        "data: generated",
        "disk:",
    ):
        assert expected in out, out
    # a library released after the last tested version (CI installs the newest) is a warning, and nothing else
    warnings = [line for line in out.splitlines() if line.startswith("[ WARN ]")]
    assert all("(tested: " in line for line in warnings), out
    assert "all checks passed" in out if not warnings else f"0 error(s), {len(warnings)} warning(s)" in out


def test_findings_name_the_backend_that_shards():
    from shardtune.cli import doctor
    from shardtune.config import Config, apply_overrides
    from shardtune.model import modeling

    cfg = apply_overrides(Config(), {"parallel.backend": "deepspeed"}, "test")
    text = " | ".join(f.what for f in doctor.model(cfg, modeling.model_config(cfg)))
    assert "DeepSpeed ZeRO-3 partitions layer by layer: LlamaDecoderLayer" in text
    assert "= DeepSpeed ZeRO-3 parameter dtype" in text and "FSDP" not in text, text


@pytest.mark.slow
def test_a_wrong_wrap_class_is_named_with_the_fix(capsys, tmp_path):
    assert (
        cli(["doctor", "recipes/tiny.py", "parallel.wrap_class=LlamaLayer", f"train.output_dir={tmp_path}"])
        == 1
    )
    out = capsys.readouterr().out
    assert "parallel.wrap_class=LlamaLayer is not a class" in out
    assert "set parallel.wrap_class to one of: LlamaDecoderLayer" in out


def test_signal_lead_against_step_and_save(tmp_path):
    (short,) = signal_lead(20, step_s=5, save_s=30, measured=True)
    assert (
        short.level == "error" and "save (30 s, measured)" in short.what and "--signal=B:USR1@97" in short.fix
    )
    (enough,) = signal_lead(300, step_s=5, save_s=30, measured=False)
    assert enough.level == "ok"
    assert signal_lead(None, 5, 30, False) == []
    log = tmp_path / "slurm" / "restart-0.log"
    log.parent.mkdir()
    log.write_text(
        "[shardtune] checkpoint step 10 saved to /x/step-10 (3.9 MiB) in 12.5s\n"
        "[shardtune] checkpoint step 20 saved to /x/step-20 (3.9 MiB) in 14.0s\n"
    )
    assert logged_save_seconds(tmp_path) == 14.0


@pytest.mark.slow
def test_doctor_flag_stops_a_run_before_it_trains(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "recipes/tiny.py",
            "--doctor",
            "parallel.wrap_class=Nope",
            f"train.output_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "shardtune doctor found errors" in proc.stderr
    assert "not a class" in proc.stderr and not any(tmp_path.iterdir())


def _doctor_smoke(*args):
    return subprocess.run(
        [str(BIN / "shardtune"), "doctor", "recipes/tiny.py", "--smoke", *args],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_smoke_runs_every_stage_of_a_run():
    proc = _doctor_smoke()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = [
        ln.split(":")[0].strip() for ln in proc.stdout.splitlines() if ln.startswith(("  PASS", "  FAIL"))
    ]
    assert stages == [
        "PASS  load data and model",
        "PASS  train 2 steps",
        "PASS  save a checkpoint",
        "PASS  resume from it",
        "PASS  train 1 more step",
    ]
    assert "(step 2, saved by 2 processes)" in proc.stdout  # the resume continued from the smoke's own save


@pytest.mark.slow
def test_smoke_reports_the_stage_that_fails_and_why(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(json.dumps({"instruction": f"q{i}", "output": None if i == 2 else "a"}) for i in range(64))
    )
    proc = _doctor_smoke(f"data.source={rows}", "data.format=alpaca")
    assert proc.returncode == 1
    assert (
        "FAIL  load data and model" in proc.stdout
        and "row 3" in proc.stdout
        and "'output' is empty" in proc.stdout
    )
    assert "resume from it" not in proc.stdout  # nothing after a failed save is attempted


def test_fused_kernels_that_cannot_run_here_are_an_error_with_the_fix(capsys, tmp_path):
    assert cli(["doctor", "recipes/tiny.py", f"train.output_dir={tmp_path}"]) == 0
    assert "Liger fused kernels: off" in capsys.readouterr().out  # auto, on a CPU
    assert cli(["doctor", "recipes/tiny.py", "model.fused_kernels=true", f"train.output_dir={tmp_path}"]) == 1
    out = capsys.readouterr().out
    assert "ERROR ] model.fused_kernels=true: Liger's kernels are Triton kernels for CUDA GPUs" in out
    assert "fix: set model.fused_kernels=auto or false" in out


def test_checkpointing_auto_is_decided_as_the_run_would(capsys, tmp_path):
    """The bundled GPU configs say `fsdp_activation_checkpointing: auto`; doctor (and --doctor) must plan it as
    the run will, not stop on it."""
    args = [
        "doctor",
        "recipes/tiny.py",
        "parallel.activation_checkpointing=auto",
        f"train.output_dir={tmp_path}",
    ]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "ERROR" not in out, out  # (a library newer than the tested ones is a warning, not an error)


def test_a_failed_runs_cause_is_found_in_its_log():
    """What `doctor --smoke` and `shardtune bench` report: our own error line first, else the exception a rank
    raised (torchrun prefixes it with "[rankN]: "), never torchrun's summary, which names no cause."""
    from shardtune.cli.spawn import failure

    traceback = [
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "src/shardtune/tokenizer.py", line 98, in prepare_tokenizer',
        "[rank0]: ValueError: data.pad_token='<|x|>' is not in the tokenizer's vocabulary",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: rank 0 failed",
        "  error_file: <N/A>",
        "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
    ]
    assert (
        failure("\n".join(traceback))
        == "ValueError: data.pad_token='<|x|>' is not in the tokenizer's vocabulary"
    )
    ours = ["error: Invalid configuration:", *traceback]
    assert failure("\n".join(ours)) == "error: Invalid configuration:"


def test_data_the_run_would_refuse_is_found_before_the_run(capsys, tmp_path):
    """The failure doctor missed on a GPU: a pad token the tokenizer lacks stops the run at its first step."""
    args = [
        "doctor",
        "recipes/tiny.py",
        "data.pad_token=<|reserved_special_token_0|>",
        f"train.output_dir={tmp_path}",
    ]
    assert cli(args) == 1
    out = capsys.readouterr().out
    assert "data: data.pad_token='<|reserved_special_token_0|>' is not in the tokenizer's vocabulary" in out


def test_missing_triton_is_a_warning_that_names_what_slows_and_the_fix(monkeypatch):
    """On a GPU without Triton shardtune's own kernels cannot run: a warning, with what it costs and the fix."""
    from shardtune import kernels
    from shardtune.cli import doctor

    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    missing = doctor.triton_kernels()
    assert (
        missing.level == "warn" and "shardtune plan" in missing.what and "pip install triton" in missing.fix
    )
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert doctor.triton_kernels().level == "ok"


def test_padding_that_costs_a_quarter_of_the_compute_is_a_warning_with_the_fix(capsys, tmp_path):
    """Rows of very different lengths in micro-batches of 4: doctor says what share of the compute padding
    takes and that data.packing=true saves it (the run logs the same line)."""
    rows = tmp_path / "rows.jsonl"
    lengths = [3] * 30 + [300] * 2  # a long row in most micro-batches of 4
    rows.write_text("".join(json.dumps({"prompt": "a b ", "completion": "c " * n}) + "\n" for n in lengths))
    args = [
        "doctor",
        "recipes/tiny.py",
        f"data.source={rows}",
        "data.test_size=2",
        f"train.output_dir={tmp_path}",
    ]
    cli([*args, "train.global_batch_size=8", "train.micro_batch_size=4"])
    out = capsys.readouterr().out
    warn = next(line for line in out.splitlines() if "padded to their longest row" in line)
    assert warn.startswith("[ WARN ] data: micro-batches of 4 rows padded to their longest row: ")
    assert "fix: data.packing=true" in out
    cli([*args, "train.global_batch_size=8", "train.micro_batch_size=4", "data.packing=true"])
    assert "padded to their longest row" not in capsys.readouterr().out


def test_a_missing_deepspeed_is_an_error_with_the_fix(monkeypatch):
    import importlib.util

    from shardtune.cli import doctor
    from shardtune.config import Config, apply_overrides

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real(n, *a))
    cfg = apply_overrides(Config(), {"parallel.backend": "deepspeed"}, "test")
    [finding] = doctor.backend(cfg.parallel)
    assert finding.level == "error" and "parallel.backend=deepspeed" in finding.what
    assert "pip install 'shardtune[deepspeed]'" in finding.fix
    assert doctor.backend(Config().parallel) == []


# ------------------------------------------------------------------------------------------- --numerics
NUMERICS = ["-m", "shardtune.cli", "doctor", "recipes/tiny.py", "--numerics"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher,config,fault",
    [
        ("torchrun", None, None),
        ("torchrun", None, "fsdp-bf16-buffers"),  # what accelerate's own FSDP mixed precision does to buffers
        ("accelerate", "fsdp_configs/zero3_cpu_2proc.yaml", None),
    ],
    ids=["fsdp", "fsdp-casting-buffers-to-bf16", "zero3"],
)
def test_numerics_compares_the_sharded_model_with_an_unsharded_copy(launcher, config, fault):
    """Launched as the run is, on 2 CPU processes: the first 2 layers built as the run builds them, sharded
    (FSDP; ZeRO-3 through an accelerate DeepSpeed config) and unsharded; logits, loss and the adapters' summed
    gradients agree (float32: bit-identical); a broken setting is caught, with what differs and the fix."""
    from conftest import launch

    env = {"SHARDTUNE_NUMERICS_FAULT": fault} if fault else None
    kwargs = {"config": config} if config else {}
    proc = launch(NUMERICS, launcher=launcher, env=env, check=False, **kwargs)
    out = proc.stdout
    assert "shardtune doctor --numerics: 2 of the model's decoder layers (tiny, NF4 4-bit" in out, (
        proc.stderr[-4000:]
    )
    assert (
        f"{'DeepSpeed ZeRO-3' if config else 'FSDP FULL_SHARD'} on 2 CPU process(es), compute float32" in out
    )
    if fault is None:
        assert proc.returncode == 0 and "verdict: OK" in out, out
        assert out.count("0 (bit-identical)") >= 2  # the forward: logits and loss
    else:
        assert proc.returncode != 0 and "verdict: FAILED: logits" in out, out
        assert "the sharded forward already differs" in out
        assert "rotary_emb.inv_freq: bfloat16 sharded, float32 unsharded" in out and "fix: buffers" in out


@pytest.mark.slow
def test_numerics_on_one_process_with_sharding_forced():
    """One process (one GPU's machine) goes through FSDP's wrapping anyway with --force-sharding: the same model
    computes the same in float32, and the bf16 buffer cast is caught there too."""
    from conftest import launch

    for fault, code in ((None, 0), ("fsdp-bf16-buffers", 1)):
        env = {"SHARDTUNE_NUMERICS_FAULT": fault} if fault else None
        proc = launch([*NUMERICS, "--force-sharding"], launcher="python", env=env, check=False)
        assert "FSDP FULL_SHARD (forced on one process) on 1 CPU process(es)" in proc.stdout, proc.stderr[
            -3000:
        ]
        assert proc.returncode == code, proc.stdout
        assert ("verdict: OK" if code == 0 else "rotary_emb.inv_freq: bfloat16 sharded") in proc.stdout


def test_numerics_verdicts_say_what_differs_and_what_to_change():
    from shardtune.cli.numerics import Result, tolerances

    assert tolerances("float32", "fsdp") == {"logits": 0.0, "loss": 0.0, "adapter gradients": 0.0}
    assert tolerances("float32", "deepspeed")["adapter gradients"] == 1e-5  # its own linear's backward
    assert set(tolerances("bfloat16", "fsdp").values()) == {1e-3}
    same = dict.fromkeys(("logits", "loss", "adapter gradients"), 0.0)
    ok = Result("x", "float32", same, tolerances("float32", "fsdp"), [], 2)
    assert ok.ok and "verdict: OK" in ok.report()
    grads = Result(
        "x", "bfloat16", {**same, "adapter gradients": 0.02}, tolerances("bfloat16", "fsdp"), [], 2
    )
    text = grads.report()
    assert not grads.ok and "verdict: FAILED: adapter gradients 0.02 over the tolerance (bfloat16)" in text
    assert "the forward agrees" in text and "fix: the step must sum the adapters' gradients" in text
    forward = Result("x", "float32", {**same, "logits": 1e-7}, tolerances("float32", "fsdp"), [], 2)
    assert "OVER the tolerance (bit-identical)" in forward.report()
    assert "fix: keep the 4-bit storage dtype equal to the compute dtype" in forward.report()
    alone = Result("x", "float32", same, tolerances("float32", "fsdp"), [], 1)
    assert "one process: nothing is sharded" in alone.report()
