"""Activation offloading (parallel.activation_checkpointing=offload): the tensors a decoder layer keeps for
backward go to pinned host memory while the next layers compute, and come back ahead of its backward, so the
layer keeps next to nothing on the GPU between its forward and its backward and recomputes nothing.

How, per offloaded layer (every parallel.checkpoint_every-th, or the o layers of a pattern):
- forward: autograd's saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks) are on while the layer
  runs. Every floating-point tensor of at least MIN_BYTES that autograd saves, except the layer's own weights
  (FSDP's gathered views, the adapters), is copied into pinned host memory on a side stream; the GPU copy is
  freed once that copy is done (record_stream: no wait on the compute stream). A tensor saved twice (the
  normalized input of q, k and v) is copied once. Before an offloaded layer starts, the compute stream waits
  for the copies of the one before it, so at most about two layers' tensors are in flight.
- backward: the first tensor a layer needs brings back all of that layer's tensors (if the prefetch has not
  already) and starts bringing back the next offloaded layer below it, on the side stream, while this layer's
  backward computes. The compute stream waits for a layer's copies before using them.
- the topmost chosen layer keeps its tensors on the GPU: of the chosen layers backward needs its first, with
  only the layers above it in between, so its copy out and back would mostly be waited for, and the plan
  counts two layers' tensors in flight on the GPU anyway. Its first unpack asks the next one below back, as
  for the others. (One chosen layer alone is therefore not offloaded at all: the log says so.)

A copy to the host and back is the same bytes: losses and gradients are bit for bit those of keeping the
tensors (tests/test_offload.py on a CPU, where the "host" copy is a clone in the same memory and the streams
are absent; tests/gpu on a GPU). What stays on the GPU: small tensors, integer ones (token positions, masks),
and views that are not dense (a copy with other strides could change a kernel's order of summation)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import saved_tensors_hooks

log = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # smaller tensors stay: a copy's fixed cost (~10 us) would outweigh the memory
# on a CPU the "host" copy is a clone in the same memory (the mechanism, for tests): small models' tensors go too
CPU_MIN_BYTES = 4096


@dataclass
class _Saved:
    """One offloaded tensor: its host copy, its device copy once brought back, and how many unpacks remain."""

    layer: _Layer
    key: tuple  # its place in layer.saved
    host: torch.Tensor | None
    uses: int = 1
    device_copy: torch.Tensor | None = None


@dataclass
class _Layer:
    """One offloaded layer's tensors of the current forward/backward, and the events that order its copies."""

    index: int
    saved: dict[tuple, _Saved] = field(default_factory=dict)
    param_storages: set[int] = field(default_factory=set)
    alive: list[torch.Tensor] = field(default_factory=list)  # the originals, until the layer's forward ends
    offloaded: torch.cuda.Event | None = None  # its device-to-host copies done
    fetched: torch.cuda.Event | None = None  # its host-to-device copies done (None: not started)
    fetch_started: bool = False
    below_started: bool = False  # the next offloaded layer below has been asked back
    # the topmost: its tensors stay on the GPU (only its unpack's prefetch of the one below)
    stays: bool = False


class ActivationOffloader:
    """Offloads the saved tensors of `layers` (decoder layers in forward order) to host memory; `attach` once
    after the model is built (and sharded). Counters (bytes_offloaded, bytes_kept) of the last forward are
    for the log."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.min_bytes = MIN_BYTES if self.cuda else CPU_MIN_BYTES
        self.layers: list[_Layer] = []
        self.total_layers = 0
        self.bytes_offloaded = 0
        self.bytes_kept = 0
        self._current: _Layer | None = None
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)

    @property
    def sent_layers(self) -> int:
        """Layers whose tensors go to host memory (the chosen ones but the topmost, which keeps its own)."""
        return sum(not layer.stays for layer in self.layers)

    def attach(self, layers: list[torch.nn.Module], chosen: list[bool] | None = None) -> None:
        """Offload the `chosen` ones of `layers` (all by default): the hooks go on around each one's forward
        (forward hooks, not a wrapper module: parameter names, and so checkpoints and exported adapters, stay
        what they are)."""
        self.total_layers = len(layers)
        for module, offloads in zip(layers, chosen or [True] * len(layers), strict=True):
            if not offloads:
                continue
            layer = _Layer(len(self.layers))
            self.layers.append(layer)
            module.register_forward_pre_hook(self._enter_hook(layer, module))
            module.register_forward_hook(self._exit_hook)
        if self.layers:
            self.layers[-1].stays = True

    # ------------------------------------------------------------------------------------------ forward
    def _enter_hook(self, layer: _Layer, module: torch.nn.Module):
        def enter(_module, _args):
            if not torch.is_grad_enabled():
                return  # evaluation, generation, DPO's reference: nothing is saved
            if layer.index == 0:
                self.bytes_offloaded = self.bytes_kept = 0
            layer.saved.clear()  # what a forward without backward left (a failed step)
            layer.fetch_started, layer.below_started, layer.fetched = layer.stays, False, None
            # under FSDP the weights are views of the unit's gathered storage by now: never offload those
            layer.param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
            if self.cuda and layer.index > 0 and self.layers[layer.index - 1].offloaded is not None:
                # bound what is in flight: the layer before has finished copying out
                torch.cuda.current_stream(self.device).wait_event(self.layers[layer.index - 1].offloaded)
            self._current = layer
            self._hooks.__enter__()

        return enter

    def _exit_hook(self, _module, _args, _output):
        if self._current is None:
            return
        layer, self._current = self._current, None
        self._hooks.__exit__(None, None, None)
        if self.cuda:
            layer.offloaded = self.stream.record_event()
        layer.alive.clear()  # on a GPU each is freed once its copy is done (record_stream)

    def _pack(self, t: torch.Tensor):
        layer = self._current
        if not self._offloads(t, layer):
            self.bytes_kept += t.numel() * t.element_size()
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in layer.saved:
            layer.saved[key].uses += 1
            return layer.saved[key]
        if layer.stays:
            self.bytes_kept += t.numel() * t.element_size()
            saved = layer.saved[key] = _Saved(layer, key, None, device_copy=t)
            return saved
        self.bytes_offloaded += t.numel() * t.element_size()
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host = torch.empty_like(t, device="cpu", pin_memory=True)
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # freed once the copy is done, without the compute stream waiting
        else:
            host = t.clone()  # a CPU run: the mechanism, not the memory
        # kept alive to the layer's end: no later tensor of this forward can take its address (the key)
        layer.alive.append(t)
        saved = layer.saved[key] = _Saved(layer, key, host)
        return saved

    def _offloads(self, t: torch.Tensor, layer: _Layer) -> bool:
        return (
            t.device.type == self.device.type
            and t.is_floating_point()
            and t.numel() * t.element_size() >= self.min_bytes
            and not isinstance(t, torch.nn.Parameter)
            and t.untyped_storage().data_ptr() not in layer.param_storages
            and _dense(t)
        )

    # ----------------------------------------------------------------------------------------- backward
    def _unpack(self, packed):
        if not isinstance(packed, _Saved):
            return packed
        layer = packed.layer
        if not layer.fetch_started:
            self._fetch(layer)
        if not layer.below_started:  # once per layer: overlaps with this layer's backward
            layer.below_started = True
            below = self._next_below(layer)
            if below is not None and not below.fetch_started:
                self._fetch(below)
        if self.cuda and not layer.stays:
            torch.cuda.current_stream(self.device).wait_event(layer.fetched)
        t = packed.device_copy
        packed.uses -= 1
        if not packed.uses:
            packed.device_copy = None
            del layer.saved[packed.key]
        return t

    def _next_below(self, layer: _Layer) -> _Layer | None:
        for other in reversed(self.layers[: layer.index]):
            if other.saved:
                return other
        return None

    def _fetch(self, layer: _Layer) -> None:
        """Bring every tensor of `layer` back, on the side stream (allocated on the compute stream, after
        everything it has queued, so no block is written while a kernel still reads it)."""
        layer.fetch_started = True
        if not self.cuda:
            for saved in layer.saved.values():
                saved.device_copy, saved.host = saved.host, None
            return
        compute = torch.cuda.current_stream(self.device)
        copies = [(s, torch.empty_like(s.host, device=self.device)) for s in layer.saved.values()]
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            for saved, dst in copies:
                dst.copy_(saved.host, non_blocking=True)
                saved.device_copy, saved.host = dst, None  # the pinned block is reused once the copy is done
        layer.fetched = self.stream.record_event()


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` covers its memory without gaps or overlaps, in some order of its dimensions (a copy with the
    same strides is then the same layout, and no kernel reading it sums in another order)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True
