"""The parts of a run, in-process and fast: the decision at a step boundary, TrainState's round trip through a
checkpoint's train_state.json, and the Backend contract at world size 1 (both backends); how a launched worker
exits."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from shardtune.config import Config, apply_overrides
from shardtune.model import loading, modeling
from shardtune.parallel.backend import backend_for
from shardtune.parallel.distributed import DistInfo
from shardtune.train.boundary import Boundary, decide
from shardtune.train.state import TrainState

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------- auto settings
def test_micro_batch_auto_is_decided_before_the_sampler_cuts_the_steps(tmp_path):
    """train.micro_batch_size=auto on a CPU (no GPU memory to plan for): the largest micro-batch of 1, 2 ... 32
    rows that divides the process's rows per step, decided once the data are read and before the sampler cuts
    each step into micro-batches; the run directory's config.yaml keeps 'auto' (a resume decides again)."""
    from shardtune.parallel.distributed import init_distributed, teardown
    from shardtune.train.run import Run

    overrides = {"train.micro_batch_size": "auto", "train.global_batch_size": 24, "eval.samples": 0}
    paths = {"train.output_dir": str(tmp_path), "train.run_name": "auto", "parallel.device": "cpu"}
    cfg = apply_overrides(Config(), {**overrides, **paths}, "test")
    environ = dict(os.environ)
    try:
        run = Run(cfg, init_distributed("cpu"), "auto")
        run.start()
        run.prepare_data()
    finally:  # a group of one, gone again
        teardown()
        os.environ.clear()
        os.environ.update(environ)
    assert run.cfg.train.micro_batch_size == 8  # 24 rows a step: 8 divides them, 16 and 32 do not
    assert [len(m) for m in run.sampler.micro_batches(0)] == [8, 8, 8]
    assert "micro_batch_size: auto" in (tmp_path / "auto" / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------- the boundary
def at(done, total=100, eval_every=10, save_every=25, signalled=False, timed=False, evaluated=False):
    return decide(done, total, eval_every, save_every, signalled, timed, evaluated)


def test_a_plain_step_does_nothing_and_cadences_fire_on_their_multiples():
    assert at(7) == Boundary(eval_now=False, eval_pending=False, save=False, stop=False)
    assert at(10) == Boundary(eval_now=True, eval_pending=False, save=False, stop=False)
    assert at(25) == Boundary(eval_now=False, eval_pending=False, save=True, stop=False)
    assert at(50) == Boundary(eval_now=True, eval_pending=False, save=True, stop=False)
    assert at(7, timed=True).save and not at(7, timed=True).stop  # the save timer ran out
    assert at(10, eval_every=0) == at(7) and at(25, save_every=0) == at(7)  # 0: never in the loop


def test_the_last_step_leaves_eval_and_save_to_the_end_of_the_run():
    """The run's end evaluates and saves once; the loop does not do it a second time at the last step."""
    assert not at(100).eval_now and not at(100).eval_pending
    assert at(100, save_every=50).save  # (a periodic save at the last step is still the loop's)


def test_a_signal_saves_and_stops_and_leaves_a_due_eval_to_the_next_start():
    b = at(30, signalled=True)
    assert b == Boundary(eval_now=False, eval_pending=True, save=True, stop=True)
    assert at(33, signalled=True) == Boundary(eval_now=False, eval_pending=False, save=True, stop=True)
    # a signal after the last step: saved, but nothing is left to stop
    assert at(100, signalled=True) == Boundary(eval_now=False, eval_pending=False, save=True, stop=False)


def test_a_signal_during_the_eval_saves_at_this_step_with_the_eval_done():
    b = at(30, signalled=True, evaluated=True)
    assert b == Boundary(eval_now=False, eval_pending=False, save=True, stop=True)


# ------------------------------------------------------------------------------------------- TrainState
def test_train_state_round_trips_through_json_and_reads_older_checkpoints():
    state = TrainState(step=12, tokens_seen=4096, first_eval={"eval_loss": 2.5}, eval_pending=True)
    state.data_fingerprint = "abc"
    again = TrainState()
    again.load_state_dict(json.loads(json.dumps({**state.state_dict(), "scheduler": {}, "world_size": 2})))
    assert again == state
    older = TrainState(step=3, tokens_seen=7)
    older.load_state_dict({"step": 5})  # a checkpoint written before some fields existed: their defaults
    assert older == TrainState(step=5)


# ---------------------------------------------------------------------------------- the Backend contract
BACKENDS = ["fsdp"] + (["deepspeed"] if importlib.util.find_spec("deepspeed") else [])


def built(backend_name: str):
    cfg = apply_overrides(Config(), {"parallel.backend": backend_name, "lora.fused": "auto"}, "test")
    backend = backend_for(cfg.parallel, cfg.param_dtype, DistInfo.alone(CPU), 4, 1.0)
    model, _ = loading.build_model(cfg, modeling.model_config(cfg), None, "sdpa", backend, CPU)
    return cfg, backend, model


@pytest.mark.parametrize("name", BACKENDS)
def test_the_backend_contract_at_world_size_one(name):
    """One process has nothing to shard: the backend hands back the plain PEFT model, and its backward and step
    are torch's own (adapters summed over no ranks, clipped to max_grad_norm, AdamW); its trainable state
    names the adapters as PEFT does and loads back in place."""
    torch.manual_seed(0)
    _, backend, model = built(name)
    torch.manual_seed(0)
    _, _, reference = built(name)
    assert backend.unwrap() is model and model.peft_config["default"].r == 16
    assert backend.sharding_report()["local"] == backend.sharding_report()["total"]
    adapters = [p for p in model.parameters() if p.requires_grad]
    wrapped = backend.wrap(torch.optim.AdamW(adapters, lr=1e-2))
    ref_adapters = [p for p in reference.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_adapters, lr=1e-2)
    with torch.no_grad():  # lora_B starts at zero: nonzero adapters so that every one takes part
        for p, q in zip(adapters, ref_adapters, strict=True):
            p.copy_(torch.randn_like(p) * 0.05)
            q.copy_(p)
    batch = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))

    backend.backward(wrapped(input_ids=batch, labels=batch).loss * 3)
    norm = backend.step()
    (reference(input_ids=batch, labels=batch).loss * 3).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_adapters, 1.0)
    ref_opt.step()
    assert torch.equal(norm, ref_norm) and all(p.grad is None for p in adapters)
    assert all(torch.equal(p, q) for p, q in zip(adapters, ref_adapters, strict=True))

    msd, osd = backend.trainable_state()
    peft_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(msd) == peft_names and set(osd["state"]) == peft_names
    saved = {k: v.clone() for k, v in msd.items()}
    with torch.no_grad():
        for p in adapters:
            p.add_(1.0)
    fresh_msd, fresh_osd = backend.trainable_state(fresh=True)
    for k, v in saved.items():  # what DCP would do: load in place into the tensors trainable_state gave
        fresh_msd[k].copy_(v)
    backend.load_trainable_state(fresh_msd, fresh_osd)
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("code,rc", [(None, 0), (0, 0), (75, 75), ("error: bad input", 1)])
def test_a_launched_worker_exits_with_its_code_and_its_output_flushed(code, rc):
    """exit_process ends the process without Python's finalization (the gloo threads' abort) as sys.exit
    would: the code (a message printed, 1), and what was written but not yet flushed reaches the streams."""
    script = (
        "import logging, sys\n"
        "from shardtune.parallel.distributed import exit_process\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "sys.stdout.write('unflushed stdout')\n"
        "logging.getLogger('x').warning('a log line')\n"
        f"exit_process({code!r})\n"
        "print('never')\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == rc
    assert proc.stdout == "unflushed stdout" and "a log line" in proc.stderr
    assert ("error: bad input" in proc.stderr) == isinstance(code, str)


@pytest.mark.parametrize(
    "worker",
    [p for p in sorted((ROOT / "tests" / "workers").glob("*.py")) if "init_distributed(" in p.read_text()],
    ids=lambda p: p.name,
)
def test_a_worker_that_joins_a_process_group_ends_through_exit_process(worker):
    """A test worker that makes its own process group must end as the launched run does (exit_process), or
    gloo's leftover threads abort it after it printed its result, now and then (seen in CI: SIGABRT,
    'terminate called without an active exception', after gpu_exact.py's line under DeepSpeed on CPU)."""
    lines = [line.strip() for line in worker.read_text().splitlines() if line.strip()]
    assert lines[-1].startswith("exit_process("), f"{worker.name} ends with {lines[-1]!r}"
