"""The step log: the CUDA allocator's cache flushes reported once, with what to change."""

from shardtune.observability.metrics import MetricsSink


def step(retries: int) -> dict:
    return {
        "loss": 1.0,
        "lr": 1e-4,
        "grad_norm": 0.5,
        "tokens_per_s_per_device": 1000.0,
        "mfu": 0.5,
        "host_peak_gib": 1.0,
        "gpu_peak_gib": 100.0,
        "alloc_retries": retries,
        "device_kind": "GPU",
    }


def test_allocator_retries_are_warned_about_once(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").touch()
    sink = MetricsSink(tmp_path, total_steps=4, start_step=0, enabled=True)
    sink.train_step(1, step(0), log_line=True)
    assert "allocator" not in capsys.readouterr().out
    sink.train_step(2, step(3), log_line=True)
    sink.train_step(3, step(5), log_line=True)
    out = capsys.readouterr().out
    assert out.count("CUDA allocator emptied its cache") == 1
    assert "by step 2" in out and "3 time(s)" in out and "train.micro_batch_size" in out
