"""The checkpoint manager in one process (real DCP; the sharded 2-process path runs in test_train.py):
atomic saves, manifests that catch a truncated or corrupted file, fallback to the previous checkpoint,
purge, exact restore, adapter export."""

import json
import logging
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shardtune import loading, modeling, parallel
from shardtune.checkpoint import CheckpointManager, rng_state, set_rng_state, verify_checkpoint
from shardtune.config import Config
from shardtune.distributed import init_distributed, teardown
from shardtune.export import export_adapter
from shardtune.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    info = init_distributed("cpu")
    cfg = Config()
    modeling.write_random_base(cfg, build_tiny_tokenizer(), root / "base")
    sharder = parallel.Sharder(cfg.parallel, cfg.param_dtype, info.device, info.world_size)
    model, _ = loading.build_model(
        cfg, modeling.model_config(cfg), str(root / "base"), "sdpa", sharder, info.device
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
    yield root, info, model, opt, files
    teardown()


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_save_is_complete_and_verified(setup):
    root, info, model, opt, files = setup
    mgr = CheckpointManager(root / "a", keep_last=2, dist=info)
    path = mgr.save(7, model, opt, {"scheduler": {}, "config_hash": "x"}, files)
    assert path.name == "step-00000007" and verify_checkpoint(path) is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["world_size"] == 1
    assert {".metadata", "train_state.json", "rank00000.rng.safetensors", "adapter_config.json"} <= set(
        manifest["files"]
    )
    assert not list((root / "a").glob(".tmp-*"))
    assert json.loads((path / "train_state.json").read_text())["step"] == 7


def test_bad_files_are_named_and_the_previous_checkpoint_is_used(setup, caplog):
    root, info, model, opt, files = setup
    mgr = CheckpointManager(root / "b", keep_last=5, dist=info)
    good = mgr.save(1, model, opt, {"scheduler": {}}, files)
    bad = mgr.save(2, model, opt, {"scheduler": {}}, files)
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
    mgr.save(4, model, opt, {"scheduler": {}}, files)
    assert not (root / "b" / ".tmp-step-00000003").exists()


def test_keep_last(setup):
    root, info, model, opt, files = setup
    mgr = CheckpointManager(root / "c", keep_last=2, dist=info)
    for step in (10, 20, 30):
        mgr.save(step, model, opt, {"scheduler": {}}, files)
    assert [p.name for p in mgr.checkpoints()] == ["step-00000020", "step-00000030"]


def test_restore_is_exact(setup):
    root, info, model, opt, files = setup
    mgr = CheckpointManager(root / "d", keep_last=2, dist=info)
    weights = lora_weights(model)
    moments = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    path = mgr.save(5, model, opt, {"scheduler": {}, "tokens_seen": 99}, files)
    # move everything away from the saved state
    batch = torch.randint(0, 384, (2, 16))
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    torch.rand(10)
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters() if p.requires_grad)
    state = mgr.load(path, model, opt)
    assert state["tokens_seen"] == 99 and state["step"] == 5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(weights[n], p.detach()), n
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(moments[k], v["exp_avg"])
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved


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
    root, info, model, opt, files = setup
    mgr = CheckpointManager(root / "e", keep_last=2, dist=info)
    path = mgr.save(3, model, opt, {"scheduler": {}}, files)
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
