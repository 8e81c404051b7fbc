"""Real FSDP on 2 CPU processes (gloo): the weights are sharded and the logits are exactly the
unsharded model's. A loss curve would hide both faults measured on GPUs (README, "What runs where")."""

import datetime
import json

import pytest

from conftest import launch, launch_machines


def results(workdir):
    return [json.loads(p.read_text()) for p in sorted(workdir.glob("rank*.json"))]


@pytest.mark.slow
def test_sharded_logits_equal_unsharded_and_weights_are_sharded(tmp_path):
    launch(["tests/workers/fsdp_exact.py", str(tmp_path)])
    ranks = results(tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["identical"], f"rank {r['rank']}: logits differ by {r['max_abs_diff']}"
        # each rank holds about half of every flat parameter (4-bit base, norms, embeddings) and the
        # adapters whole, their gradients summed over the ranks
        assert r["total"] > 0 and 0.45 < r["local"] / r["total"] < 0.55
        assert r["shard_group"] == [0, 1] and r["replica_group"] is None
        assert r["adapters_whole"] and r["grads_reduced"]
    assert ranks[0]["adapter_sum"] == ranks[1]["adapter_sum"]
    assert ranks[0]["losses"][0] == ranks[0]["losses"][1] == ranks[1]["losses"][0]


@pytest.mark.slow
def test_hybrid_shard_shards_within_a_machine_and_replicates_across(tmp_path):
    """parallel.sharding_strategy=HYBRID_SHARD (for several machines: all-gathers stay inside one) on 2 machines x
    2 processes: each process holds half of the base, shared with the other process of its machine (not a
    quarter, not with the other machine) and replicated on its counterpart there; the logits equal the
    unsharded model's; the adapters' gradients are summed over all 4 processes."""
    work = tmp_path / "work"
    work.mkdir()
    launch_machines(
        ["tests/workers/fsdp_exact.py", str(work), "parallel.sharding_strategy=HYBRID_SHARD"], tmp_path
    )
    ranks = results(work)
    assert [r["world"] for r in ranks] == [4, 4, 4, 4]
    for r in ranks:
        assert r["identical"], f"rank {r['rank']}: logits differ by {r['max_abs_diff']}"
        assert r["total"] > 0 and 0.45 < r["local"] / r["total"] < 0.55
        machine = r["rank"] // 2
        assert r["shard_group"] == [2 * machine, 2 * machine + 1], r
        assert r["replica_group"] == [r["rank"] % 2, r["rank"] % 2 + 2], r
        assert r["adapters_whole"] and r["grads_reduced"]


@pytest.mark.slow
def test_an_8bit_base_is_whole_on_every_process_and_exact(tmp_path):
    """quant.bits=8 (LLM.int8): FSDP1 cannot flatten int8 weights, so with several processes each holds the whole
    8-bit base (NO_SHARD, which the run sets) and no layer is wrapped; its logits equal transformers'
    BitsAndBytesConfig(load_in_8bit=True) model's + PEFT's bit for bit, the adapters' gradients are summed over
    the ranks as under FSDP. Any other strategy is refused, saying why."""
    launch(
        ["tests/workers/fsdp_exact.py", str(tmp_path), "quant.bits=8", "parallel.sharding_strategy=NO_SHARD"]
    )
    ranks = results(tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["identical"], f"rank {r['rank']}: logits differ by {r['max_abs_diff']}"
        assert r["local"] == r["total"] > 0 and r["shard_group"] is None
        assert r["adapters_whole"] and r["grads_reduced"] and r["int8_layers"] == 28
    assert ranks[0]["losses"][0] == ranks[1]["losses"][0]
    (tmp_path / "full").mkdir()
    refused = launch(["tests/workers/fsdp_exact.py", str(tmp_path / "full"), "quant.bits=8"], check=False)
    assert "FSDP cannot shard an 8-bit base (quant.bits=8)" in refused.stdout + refused.stderr


@pytest.mark.slow
def test_one_process_trains_the_plain_module(tmp_path):
    launch(["tests/workers/fsdp_exact.py", str(tmp_path)], nproc=1)
    (r,) = results(tmp_path)
    assert r["identical"] and r["local"] == r["total"] and r["grads_reduced"]


def test_restarts_across_machines_need_a_store_per_attempt(monkeypatch):
    """torchrun --max-restarts on several machines with the shared rendezvous store fails at the first restart
    (the launchers' restart counts differ, so no key prefix can keep the attempts apart): refused at the start
    with the fix; with the store per attempt that TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives (slurm/train.sh),
    or without restarts, torch's own store is used."""
    from shardtune.errors import ConfigError
    from shardtune.parallel.distributed import _restart_store

    timeout = datetime.timedelta(seconds=5)
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "0"}
    for key, value in {**env, "TORCHELASTIC_MAX_RESTARTS": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment"):
        _restart_store(4, timeout)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the store per attempt looks like
    assert _restart_store(4, timeout) is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert _restart_store(4, timeout) is None
