"""The checkpoint manager in one process (real DCP; the sharded 2-process path runs in test_train.py):
atomic saves, manifests that catch a truncated or corrupted file, fallback to the previous checkpoint,
purge, exact restore, adapter export."""

import json
import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tmpfs
from shardtune.checkpoint.export import export_adapter
from shardtune.checkpoint.manager import SAVE_SLACK, CheckpointManager, rng_state, set_rng_state
from shardtune.checkpoint.resume import resume_point, set_aside_after
from shardtune.checkpoint.store import verify_checkpoint
from shardtune.config import Config, OptimConfig, to_yaml
from shardtune.errors import ConfigError, DiskFull
from shardtune.files import mib, out_of_space, tree_bytes, write_atomic
from shardtune.model import loading, modeling
from shardtune.model.tokenizer import build_tiny_tokenizer
from shardtune.parallel.distributed import init_distributed, teardown
from shardtune.parallel.fsdp import FsdpBackend
from shardtune.train.optim import build_optimizer
from shardtune.train.state import TrainState

OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    info = init_distributed("cpu")
    cfg = Config()
    modeling.write_random_base(cfg, build_tiny_tokenizer(), root / "base")
    backend = FsdpBackend(cfg.parallel, cfg.param_dtype, info)
    model, _ = loading.build_model(
        cfg, modeling.model_config(cfg), str(root / "base"), "sdpa", backend, info.device
    )
    peft_config = model.peft_config["default"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 384, (2, 16))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    peft_config.save_pretrained(root / "peft")
    files = {
        "adapter_config.json": (root / "peft" / "adapter_config.json").read_bytes(),
        "model_config.json": (root / "base" / "config.json").read_bytes(),
    }
    backend.wrap(opt)
    yield SimpleNamespace(root=root, info=info, model=model, opt=opt, files=files, backend=backend)
    teardown()


def manager(setup, directory, keep_last=2, optimizer=None, **state):
    """A checkpoint manager tracking the fixture's model, `optimizer` (the fixture's by default) and a
    TrainState with `state`."""
    setup.backend.wrap(optimizer or setup.opt)
    mgr = CheckpointManager(directory, keep_last=keep_last, dist=setup.info)
    mgr.track(setup.backend, TrainState(**state), scheduler=None)
    return mgr


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_save_is_complete_and_verified(setup):
    root, files = setup.root, setup.files
    mgr = manager(setup, root / "a")
    path = mgr.save(7, files)
    assert path.name == "step-00000007" and verify_checkpoint(path) is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["world_size"] == 1
    assert {".metadata", "train_state.json", "rank00000.rng.safetensors", "adapter_config.json"} <= set(
        manifest["files"]
    )
    assert not list((root / "a").glob(".tmp-*"))
    assert json.loads((path / "train_state.json").read_text())["step"] == 7


def test_bad_files_are_named_and_the_previous_checkpoint_is_used(setup, caplog):
    root, files = setup.root, setup.files
    mgr = manager(setup, root / "b", keep_last=5)
    good = mgr.save(1, files)
    bad = mgr.save(2, files)
    shard = next(bad.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(bad) == f"{shard.name} does not match its checksum (corrupted)"
    with caplog.at_level(logging.WARNING):
        assert mgr.latest() == good
    assert shard.name in caplog.text
    shard.write_bytes(bytes(data[:100]))
    assert "truncated" in verify_checkpoint(bad)
    (bad / "manifest.json").unlink()
    assert "no manifest.json" in verify_checkpoint(bad)
    # a save killed before its rename leaves only a hidden temporary directory, never a step-N one
    (root / "b" / ".tmp-step-00000003").mkdir()
    assert mgr.latest() == good
    mgr.save(4, files)
    assert not (root / "b" / ".tmp-step-00000003").exists()


def test_keep_last(setup):
    root, files = setup.root, setup.files
    mgr = manager(setup, root / "c")
    for step in (10, 20, 30):
        mgr.save(step, files)
    assert [p.name for p in mgr.checkpoints()] == ["step-00000020", "step-00000030"]


def corrupt(path):
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_checkpoints_off_the_runs_path_are_set_aside_never_kept_in_place_of_good_ones(setup, caplog):
    """The run resumes an older checkpoint than the newest (the newest is corrupted, or train.resume names an
    older one): the newer ones move to checkpoints/abandoned/, so a save keeps keep_last good ones counting
    from itself (before, a save kept the newer broken one and deleted itself and the good one), the next
    resume=auto cannot jump back to them, and nothing is deleted."""
    root, files = setup.root, setup.files
    files = {**files, "config.yaml": to_yaml(Config()).encode()}
    d = root / "aside"
    two = manager(setup, d)
    for step in (1, 2, 3):
        two.save(step, files)
    corrupt(d / "step-00000003")
    one = manager(setup, d, keep_last=1)
    with caplog.at_level(logging.WARNING):
        assert resume_point("auto", one, to_yaml(Config())) == d / "step-00000002"
        set_aside_after(one, 2)  # (the run does this once nothing refuses the resume)
    assert "step-00000003 set aside" in caplog.text
    assert [p.name for p in one.checkpoints()] == ["step-00000002"]
    one.save(3, files)  # the run redoes step 3
    assert [p.name for p in one.checkpoints()] == ["step-00000003"] and one.latest() == d / "step-00000003"
    assert verify_checkpoint(d / "abandoned" / "step-00000003") is not None  # the broken one, kept aside
    # resuming an older one by name: the newer ones go aside too
    two.save(4, files)
    two.save(5, files)
    assert resume_point(str(d / "step-00000004"), two, to_yaml(Config())) == d / "step-00000004"
    set_aside_after(two, 4)
    assert two.latest() == d / "step-00000004"
    assert sorted(p.name for p in (d / "abandoned").iterdir()) == ["step-00000003", "step-00000005"]
    # a copy with another name is not a checkpoint; none intact: refused, not started over from step 0
    (d / "step-00000004").rename(d / "step-00000004.bak")
    two.save(6, files)
    corrupt(d / "step-00000006")
    assert [p.name for p in two.checkpoints()] == ["step-00000006"]
    # (a replacement killed between its two renames left it as .old-step-N: back under its name at the start)
    (d / "step-00000006").rename(d / ".old-step-00000006")
    with pytest.raises(ConfigError, match=r"(?s)none is intact.*step-00000006: .*checksum"):
        resume_point("auto", two, to_yaml(Config()))
    assert (d / "step-00000006").is_dir() and (d / "step-00000004.bak").is_dir()


def test_an_optimizer_that_has_not_stepped_is_saved_and_restored_as_it_is(setup):
    """fp16's loss scaler skips the steps whose gradients overflow; a save before the first step that was
    taken must not give AdamW a state (a step count) it never had, nor a resume."""
    root, model, files = setup.root, setup.model, setup.files
    fresh = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mgr = manager(setup, root / "unstepped", optimizer=fresh)
    path = mgr.save(2, files)
    assert not fresh.state and json.loads((path / "train_state.json").read_text())["optimizer_state"] is False
    again = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mgr = manager(setup, root / "unstepped", optimizer=again)
    mgr.load(path)
    assert not again.state


def test_restore_is_exact(setup):
    root, model, opt, files = setup.root, setup.model, setup.opt, setup.files
    mgr = manager(setup, root / "d", tokens_seen=99)
    weights = lora_weights(model)
    moments = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    path = mgr.save(5, files)
    # move everything away from the saved state
    batch = torch.randint(0, 384, (2, 16))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    torch.rand(10)
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters() if p.requires_grad)
    mgr.train_state.tokens_seen = 0
    state = mgr.load(path)
    assert state["tokens_seen"] == mgr.train_state.tokens_seen == 99 and state["step"] == 5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(weights[n], p.detach()), n
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(moments[k], v["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved


def _steps(model, optimizer, seeds) -> None:
    for seed in seeds:
        batch = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(seed))
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_resumes_exactly(setup, tmp_path, name):
    """Each optim.name's state goes into the checkpoint and comes back in place: 2 steps, a save, 3 more; a
    fresh optimizer (as a resumed run builds) loaded from the checkpoint takes the same 3 steps bit for bit.
    (Paged ones run unpaged on the CPU, their state laid out the same; paged on a GPU: tests/gpu.)"""
    model, files = setup.model, setup.files
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    settings = OptimConfig(name=name, lr=1e-2, weight_decay=0.01)
    try:
        first = build_optimizer(settings, params)
        _steps(model, first, (1, 2))
        path = manager(setup, tmp_path, optimizer=first).save(2, files)
        _steps(model, first, (3, 4, 5))
        expected = [p.detach().clone() for p in params]
        state = first.state[params[0]]
        if name.endswith("8bit"):  # 8-bit codes and their per-block scales: lora_A of q_proj, 16 x 256
            assert state["state1"].dtype == torch.uint8 and state["absmax1"].numel() == 4096 // 256
            assert state["step"] == 5
        again = build_optimizer(settings, params)
        manager(setup, tmp_path, optimizer=again).load(path)
        assert not any(torch.equal(p, e) for p, e in zip(params, expected, strict=True))  # back at step 2
        assert again.state[params[0]]["step"] == (2 if name != "adamw" else torch.tensor(2.0))
        _steps(model, again, (3, 4, 5))
        for p, e in zip(params, expected, strict=True):
            assert torch.equal(p.detach(), e)
    finally:
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
        setup.backend.wrap(setup.opt)


def test_a_checkpoint_resumes_only_with_its_optimizer(setup, tmp_path):
    """Another optim.name's state cannot continue the run: refused before anything is loaded, naming the
    setting; a checkpoint saved before optim.name existed was torch's AdamW."""
    eight_bit = Config()
    eight_bit.optim.name = "adamw_8bit"
    older = to_yaml(Config()).replace("  name: adamw\n", "")
    assert "name: adamw" not in older
    for run, saved in (("now", to_yaml(Config())), ("older", older)):
        mgr = manager(setup, tmp_path / run)
        path = mgr.save(1, {**setup.files, "config.yaml": saved.encode()})
        with pytest.raises(ConfigError, match=r"optim\.name: checkpoint 'adamw' -> now 'adamw_8bit'"):
            resume_point("auto", mgr, to_yaml(eight_bit))
        assert resume_point("auto", mgr, to_yaml(Config())) == path


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    tensors, plain = rng_state(torch.device("cpu"))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    json.dumps(plain)  # plain JSON: no pickles in a checkpoint
    set_rng_state(tensors, plain, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_export_writes_a_whole_peft_adapter(setup):
    root, model, files = setup.root, setup.model, setup.files
    mgr = manager(setup, root / "e")
    path = mgr.save(3, files)
    out = export_adapter(path, root / "adapter")
    tensors = load_file(out / "adapter_model.safetensors")
    full = {
        n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    assert set(tensors) == set(full)
    for k, t in tensors.items():
        assert torch.equal(t, full[k]), k
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.slow
def test_streaming_load_memory_does_not_grow_with_the_model(tmp_path):
    """A 4x bigger checkpoint costs no more transient host memory to load (one matrix at a time)."""
    from conftest import launch

    results = {}
    for layers in (2, 8):
        proc = launch(
            ["tests/workers/load_memory.py", str(tmp_path / f"ckpt{layers}"), str(layers)], launcher="python"
        )
        results[layers] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, big = results[2], results[8]
    assert big["checkpoint_gib"] > 3 * small["checkpoint_gib"]
    assert big["transient_gib"] < small["transient_gib"] + 0.1
    assert big["transient_gib"] < 0.25 * big["checkpoint_gib"]


@pytest.mark.slow
def test_random_bf16_weights_are_drawn_without_a_float32_copy_of_a_whole_matrix():
    """model.init=random in bf16 (every GPU benchmark): the embeddings and head are drawn in float32 a block of
    rows at a time into their bf16 tensors. Drawn whole, a float32 copy of each (1 GiB at this vocabulary, 2 GiB
    for Llama-3-8B's) was held beside it while loading: 1.0 GiB above the built model's memory, measured."""
    from conftest import launch

    proc = launch(["tests/workers/load_memory.py", "random", "131072"], launcher="python")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    embedding_fp32_gib = 131072 * 2048 * 4 / 2**30
    assert result["model_gib"] > embedding_fp32_gib  # the two bf16 matrices (and the rest) were built
    assert result["transient_gib"] < 0.2 * embedding_fp32_gib, result


@pytest.mark.parametrize(
    "change",
    [
        {"train": {"resume": "never"}},  # refused by the resume policy
        {"lora": {"r": 8}},  # a setting that breaks exactness
        {"train": {"max_steps": 5}},  # a last step before the checkpoint's (refused once the data are read)
    ],
    ids=["resume-never", "changed-setting", "past-the-last-step"],
)
def test_a_refused_start_leaves_a_finished_runs_status_alone(setup, tmp_path, change):
    """Starting a completed run again in a way that is refused (Nothing was deleted) reports the refusal as the
    command's error; status.json still says complete, and config.yaml is still the run's."""
    from shardtune.train.run import train
    from shardtune.train.status import write_status

    finished = Config(train={"output_dir": str(tmp_path), "run_name": "run", "max_steps": 10})
    run_dir = tmp_path / "run"
    manager(setup, run_dir / "checkpoints").save(
        10, {**setup.files, "config.yaml": to_yaml(finished).encode()}
    )
    (run_dir / "config.yaml").write_text(to_yaml(finished))
    write_status(run_dir, "complete", step=10)
    before = {name: (run_dir / name).read_bytes() for name in ("status.json", "config.yaml")}
    again = Config.model_validate(
        {**finished.model_dump(), **{k: {**finished.model_dump()[k], **v} for k, v in change.items()}}
    )
    with pytest.raises(
        ConfigError, match=r"already holds checkpoints|cannot resume|past this run's last step"
    ):
        train(again, setup.info, "recipe")
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    # a run that had not finished: the refusal is recorded (an earlier start's status must not stand)
    write_status(run_dir, "interrupted", step=10)
    with pytest.raises(ConfigError):
        train(again, setup.info, "recipe")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


# ------------------------------------------------------------------------------------------- a full disk
def test_a_save_that_cannot_fit_is_refused_before_anything_is_written(setup, tmp_path, monkeypatch):
    """The last checkpoint's size against the free space (faked here): refused in one line naming the
    directory, the space needed and free, and the fix; nothing written, the earlier checkpoint intact."""
    from shardtune.checkpoint import manager as manager_module

    mgr = manager(setup, tmp_path / "c")
    first = mgr.save(1, setup.files)
    size = tree_bytes(first)
    monkeypatch.setattr(manager_module, "free_bytes", lambda path: size)  # < a checkpoint and its slack
    with pytest.raises(DiskFull) as e:
        mgr.save(2, setup.files)
    message = str(e.value)
    assert "\n" not in message and message.startswith(
        f"no room for checkpoint step-00000002 in {tmp_path / 'c'}:"
    )
    assert f"it needs about {mib(size + SAVE_SLACK)} (the last one's size), {mib(size)} free there" in message
    assert "train.output_dir" in message and f"it continues from {first}" in message
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["step-00000001"] and verify_checkpoint(
        first
    ) is None
    monkeypatch.setattr(manager_module, "free_bytes", lambda path: size + SAVE_SLACK)
    assert mgr.save(2, setup.files).is_dir()  # room enough: saved


def test_a_full_disk_mid_save_removes_the_torn_save_and_keeps_the_earlier_ones(setup, tmp_path):
    """A real full disk (a tmpfs of 6 MiB: one checkpoint of ~4 MiB fits, not two): a save that runs out of
    space (its size not known beforehand) is removed before anything else is written and reported as DiskFull
    in one line; the checkpoint before it is intact; the next save is refused before it starts."""
    with tmpfs(tmp_path / "disk", "6m") as disk:
        mgr = manager(setup, disk / "c")
        first = mgr.save(1, setup.files)
        assert 3 * 2**20 < tree_bytes(first) < 6 * 2**20
        mgr.last_size = 0  # as on a run's first save, or one that grew: no size to check beforehand
        with pytest.raises(DiskFull) as e:
            mgr.save(2, setup.files)
        message = str(e.value)
        assert "\n" not in message and message.startswith(
            f"no room for checkpoint step-00000002 in {disk / 'c'}:"
        )
        assert (
            "it needs more than the" in message and "it had written when the disk filled (removed)" in message
        )
        assert [p.name for p in (disk / "c").iterdir()] == ["step-00000001"] and verify_checkpoint(
            first
        ) is None
        assert out_of_space(e.value.__cause__)  # what DCP or safetensors raised, kept as the cause
        mgr.last_size = tree_bytes(first)
        with pytest.raises(DiskFull, match=r"it needs about .* \(the last one's size\)"):
            mgr.save(2, setup.files)
        assert [p.name for p in (disk / "c").iterdir()] == ["step-00000001"]
        write_atomic(disk / "status.json", b"{}")  # and there is room for status.json again
