"""Activation offloading (parallel.activation_checkpointing=offload, parallel/offload.py) on a CPU, where the
"host" copy is a clone and there are no streams: the mechanism (which tensors go, each brought back once, in
the order backward needs them) and exactness (the loss and adapter gradients bit for bit those of keeping
everything). On a GPU, with pinned memory and the side stream: tests/gpu/test_gpu.py."""

import pytest
import torch
from levers import batches, build, loss_and_grads

from conftest import launch

CPU = torch.device("cpu")
LENGTHS = [37, 5, 64, 18]


@pytest.mark.parametrize(
    "mode, every, dropout",
    [  # two cases in `make test-fast`, the others in `make test`
        ("offload", 2, 0.1),
        ("ork", 1, 0.1),  # a mix: offloaded, recomputed and kept layers in one model
        pytest.param("offload", 1, 0.1, marks=pytest.mark.slow),
        pytest.param("offload", 1, 0.0, marks=pytest.mark.slow),
        pytest.param("offload", 2, 0.0, marks=pytest.mark.slow),
        pytest.param("oor", 1, 0.0, marks=pytest.mark.slow),
    ],
)
def test_offloaded_layers_give_the_kept_layers_loss_and_gradients_bit_for_bit(mode, every, dropout):
    from shardtune.parallel.checkpointing import layer_plan

    ac = {"parallel.activation_checkpointing": mode, "parallel.checkpoint_every": every}
    _, kept = build({"lora.dropout": dropout}, CPU)
    held = {}
    cfg, offloaded = build({"lora.dropout": dropout, **ac}, CPU, keep=held)
    offloader = held["backend"].offloader
    layers = offloaded.base_model.model.model.layers
    plan = layer_plan(cfg.parallel, len(layers))
    assert len(offloader.layers) == plan.count("o") > 0
    recomputed = [type(m).__name__ == "CheckpointWrapper" for m in layers]
    assert recomputed == [what == "r" for what in plan], plan
    padded, _ = batches(LENGTHS, 384, 2, CPU)
    kept.train(), offloaded.train()
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(5)
        lk, gk = loss_and_grads(kept, padded, autocast_dtype=dtype)
        torch.manual_seed(5)
        lo, go = loss_and_grads(offloaded, padded, autocast_dtype=dtype)
        assert lo == lk, dtype
        assert go.keys() == gk.keys()
        for name in gk:
            torch.testing.assert_close(go[name], gk[name], rtol=0, atol=0)
        # every offloaded tensor was brought back and used: nothing left from this step
        assert offloader.bytes_offloaded > 0 and all(not layer.saved for layer in offloader.layers)


@pytest.mark.parametrize(
    "mode, every, plan",
    [
        (False, 3, "kkkkkkkk"),
        ("selective", 1, "kkkkkkkk"),
        (True, 3, "rkkrkkrk"),
        ("offload", 2, "okokokok"),
        ("offload", 10**6, "okkkkkkk"),  # (built by index: no string of a million letters)
        ("ork", 1, "orkorkor"),
        ("kkkkkkkkr", 1, "kkkkkkkk"),  # longer than the model: its first 8 letters
    ],
)
def test_the_layer_plan_spells_what_each_layer_does(mode, every, plan):
    from shardtune.config import Config, apply_overrides
    from shardtune.parallel.checkpointing import checkpointed_fraction, layer_plan

    overrides = {"parallel.activation_checkpointing": mode, "parallel.checkpoint_every": every}
    cfg = apply_overrides(Config(), overrides, "test")
    assert layer_plan(cfg.parallel, 8) == plan
    assert checkpointed_fraction(cfg.parallel, 8) == plan.count("r") / 8


def test_a_pattern_beside_checkpoint_every_is_refused_with_the_pattern_to_write():
    from shardtune.config import Config, apply_overrides
    from shardtune.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"Leave parallel\.checkpoint_every at 1.*one layer in 3 recomputed: rkk"
    ):
        apply_overrides(
            Config(), {"parallel.activation_checkpointing": "or", "parallel.checkpoint_every": 3}, "test"
        )


def test_weights_small_and_integer_tensors_stay_and_a_tensor_saved_twice_goes_once():
    """Of two chosen layers the lower sends its input (a weight, small and integer tensors stay), the topmost
    keeps its own on the GPU (backward needs it first) and its first unpack asks the lower one back."""
    from shardtune.parallel.offload import ActivationOffloader

    layer, top = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    offloader = ActivationOffloader(CPU)
    offloader.attach([layer, top])
    x = torch.randn(32, 64, requires_grad=True)
    hidden = layer(x)  # saves x (offloaded: 8 KiB) and the weight (a parameter: kept)
    assert offloader.bytes_offloaded == 32 * 64 * 4 and offloader.bytes_kept == 64 * 64 * 4  # the weight
    (saved,) = offloader.layers[0].saved.values()
    assert saved.uses == 1 and saved.host is not None and saved.device_copy is None
    out = top(hidden)  # the topmost: its input stays where it is
    (stayed,) = offloader.layers[1].saved.values()
    assert stayed.host is None and stayed.device_copy is hidden and offloader.bytes_offloaded == 32 * 64 * 4
    out.sum().backward()
    assert not offloader.layers[0].saved and not offloader.layers[1].saved
    assert torch.equal(x.grad, (torch.ones(32, 64) @ top.weight) @ layer.weight)

    def twice(m, x):
        return (x * x).sum() + torch.arange(4).float().sum()  # x saved twice by one mul

    shared = torch.nn.Module()
    shared.forward = lambda x: twice(shared, x)
    offloader2 = ActivationOffloader(CPU)
    offloader2.attach([shared, torch.nn.Identity()])
    assert offloader2.sent_layers == 1 and offloader.sent_layers == 1
    alone = ActivationOffloader(CPU)
    alone.attach([torch.nn.Identity()])
    assert alone.sent_layers == 0  # one chosen layer is the topmost: it keeps its own (the log says so)
    y = torch.randn(64, 64, requires_grad=True)
    shared(y).backward()
    assert offloader2.bytes_offloaded == 64 * 64 * 4  # once, not twice
    assert torch.equal(y.grad, 2 * y)


@pytest.mark.slow
def test_an_offloading_run_under_fsdp_has_the_plain_runs_losses(tmp_path):
    """The tiny recipe on 2 processes (FSDP, gloo), its 4 layers offloaded, recomputed and kept by the pattern
    'ork' (o r k o: the topmost o keeps its own, offload.py): the same per-step losses as keeping every layer's,
    and the log says what was offloaded."""
    from test_resume import RUN, losses

    args = [*RUN, "train.max_steps=6", "train.run_name=run"]
    launch([*args, f"train.output_dir={tmp_path / 'kept'}"])
    proc = launch([*args, f"train.output_dir={tmp_path / 'off'}", "parallel.activation_checkpointing=ork"])
    assert losses(tmp_path / "off" / "run") == losses(tmp_path / "kept" / "run")
    assert "activation offloading: 1 of 4 decoder layers (by layer, pattern ork" in proc.stderr


def test_the_plan_puts_offloaded_activations_in_host_memory_and_charges_the_copies_it_cannot_hide():
    from shardtune.config import Config, apply_overrides
    from shardtune.model.modeling import model_config
    from shardtune.planning.activations import HOST_LINK, IN_FLIGHT, OFFLOAD_FIXED_S, PINNED_ROUNDING
    from shardtune.planning.auto import describe_checkpointing
    from shardtune.planning.estimate import estimate

    base = {
        "model.name_or_path": "llama3-70b",
        "model.shape.num_hidden_layers": 20,
        "parallel.mixed_precision": "bf16",
        "model.fused_kernels": True,
        "data.max_len": 3072,
        "train.micro_batch_size": 1,
        "train.global_batch_size": 4,
    }

    def plan(ac, every=1):
        cfg = apply_overrides(
            Config(),
            {**base, "parallel.activation_checkpointing": ac, "parallel.checkpoint_every": every},
            "t",
        )
        return cfg, estimate(cfg, model_config(cfg), 1, 1, "h100")

    _, kept = plan(False)
    per_layer = kept.gpu["activations"] / 20
    for every in (1, 2, 4):
        cfg, off = plan("offload", every)
        n = len(range(0, 20, every))
        assert off.settings["parallel.activation_checkpointing"] == "offload"
        assert off.settings["parallel.checkpoint_every"] == every
        assert off.gpu["activations"] == pytest.approx((20 - n + IN_FLIGHT) * per_layer)
        extra_host = off.host["train"] - kept.host["train"]
        assert extra_host == pytest.approx(PINNED_ROUNDING * (n - 1) * per_layer)  # the topmost keeps its own
        assert describe_checkpointing(cfg.parallel).startswith("offloaded to host memory")
    # one layer's copy out takes longer than its own forward at this width and row (~1.7x): offloading every
    # layer waits for the link; every 4th hides its copies behind 3 more layers and costs only the hooks
    copy_s = per_layer / HOST_LINK["h100"]
    layer_forward_s = kept.step_s / (3 * 4 * 20)
    assert copy_s > layer_forward_s
    assert plan("offload", 1)[1].step_s > kept.step_s + 4 * 20 * (copy_s - layer_forward_s)
    assert plan("offload", 4)[1].step_s == pytest.approx(kept.step_s + 4 * 5 * OFFLOAD_FIXED_S)

    # a mix, 'ork' over 20 layers: 7 offloaded (2 in flight on the GPU, the topmost's sent nowhere), 7
    # recomputed (their input kept, one recomputed whole at a time), 6 kept
    _, recomputed = plan(True)
    boundary = (recomputed.gpu["activations"] - per_layer) / 20  # (no dropout: the whole layer is per_layer)
    cfg, mix = plan("ork")
    assert mix.settings["parallel.activation_checkpointing"] == "ork"
    assert mix.gpu["activations"] == pytest.approx((6 + IN_FLIGHT) * per_layer + 7 * boundary + per_layer)
    assert mix.host["train"] - kept.host["train"] == pytest.approx(PINNED_ROUNDING * 6 * per_layer)
    assert describe_checkpointing(cfg.parallel) == (
        "by layer, pattern ork: of every 3 layers 1 offloaded to host memory, 1 recomputed, 1 kept"
    )
    # its copies hide behind the 2 layers after each (3 forwards > 1.7), so it costs the 7 recomputations'
    # share and the hooks: faster than recomputing every layer, slower than keeping everything
    assert kept.step_s < mix.step_s < recomputed.step_s
