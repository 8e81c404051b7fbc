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


def test_an_objectives_metrics_reach_the_line_tensorboard_metrics_jsonl_and_the_plot(tmp_path, capsys):
    """DPO's reward accuracy and margin: in the log line and the eval line, in TensorBoard (train/ and eval/),
    in metrics.jsonl, and in loss.png's second panel; a resumed sink draws them again from metrics.jsonl."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shown = ("rewards/accuracies", "rewards/margins")
    sink = MetricsSink(tmp_path, 4, 0, True, shown=shown, loss_label="loss (per pair)")
    for s in (1, 2):
        sink.train_step(s, {**step(0), "rewards/accuracies": 0.25 * s, "rewards/margins": 0.5 * s}, True)
    sink.eval(
        2, {"eval_loss": 0.6, "eval_pairs": 8, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 1.5}
    )
    assert sink.plot() == tmp_path / "loss.png"
    sink.close()
    out = capsys.readouterr().out
    assert "| loss 1.0000 | reward acc 0.500 | margin 1.000 | lr" in out
    assert "eval @ step 2: loss 0.6000 over 8 pairs | reward acc 0.750 | margin 1.500" in out
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["rewards/accuracies"] == 0.5 and records[2]["eval_rewards/margins"] == 1.5
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/rewards/accuracies", "eval/rewards/accuracies", "train/rewards/margins"} <= tags
    resumed = MetricsSink(tmp_path, 4, 2, True, shown=shown)
    assert resumed.extra_points["eval_rewards/accuracies"] == [(2, 0.75)]
    assert resumed.extra_points["rewards/margins"] == [(1, 0.5), (2, 1.0)]
    resumed.close()
