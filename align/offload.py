"""Activation offloading (the `offload` speed option): the first `max_bytes` of the activations a forward saves for
its backward go to pinned host memory on a side stream while the forward goes on, and come back on another ahead of
the backward that needs them (from when the backward is `ahead_bytes` of saved activations short of them), so that
a lean budget that recomputes less still fits the memory of one that recomputes more. Exact: the same bits come back.

How: `torch.autograd.graph.saved_tensors_hooks` around the backbone's forward (not compiled), so each compiled layer's
saved tensors pass through `pack` when its forward ends and through `unpack` when its backward starts (torch runs
ambient hooks on the compiled autograd function at run time: one graph, no recompile; tests/test_offload.py).
Weights (any storage a parameter or buffer owns), small tensors and views of a larger storage stay where they are.
The first tensors saved are the first layers', whose backward runs last, which leaves the most time to bring them back.
"""

import bisect
import contextlib
import functools
import logging
import weakref

import torch

logger = logging.getLogger(__name__)

GIB = 2**30
MAX_GIB = 3.0  # default bytes offloaded per forward (recipe key `offload_gib`)
MIN_BYTES = 4 * 2**20  # smaller saved tensors stay on the device (RoPE tables, softmax statistics)
AHEAD = 1.0  # default `ahead_bytes`, times `max_bytes`: how far ahead (in saved activations) a copy back starts


class _Saved:
    """One saved tensor: on the device (`device`), or in host memory (`host`) until prefetched back; `pos`: the
    activation bytes saved up to and with it (its place in the forward, the backward's clock)."""

    __slots__ = ("pos", "device", "host", "sent", "ready", "__weakref__")

    def __init__(self, pos, device=None, host=None, sent=None):
        self.pos, self.device, self.host, self.sent, self.ready = pos, device, host, sent, None


class ActivationOffload:
    """Saved-tensor hooks that move up to `max_bytes` of a forward's saved activations off the device (CUDA: to pinned
    host memory on a side stream; the types in `device_types` other than CUDA: a copy, for tests) and back."""

    def __init__(self, model, max_bytes: int, ahead_bytes: int | None = None, min_bytes: int = MIN_BYTES,
                 device_types=("cuda",)):
        self.model, self.max_bytes, self.min_bytes = model, int(max_bytes), min_bytes
        self.ahead_bytes = int(ahead_bytes if ahead_bytes is not None else max(AHEAD * max_bytes, 512 * 2**20))
        self.device_types = tuple(device_types)
        self._weights = None  # storage pointers of parameters and buffers, found once
        self._pos = 0  # activation bytes saved so far (all forwards): each saved tensor's place
        self._sent = 0  # bytes offloaded in this forward
        self._full = False  # a tensor did not fit: nothing more in this forward
        self._live = weakref.WeakValueDictionary()  # pos -> _Saved of every offloaded tensor not yet freed
        self._waiting = []  # places (ascending) of offloaded tensors not yet prefetched
        self._streams = {}
        self._seen = {}  # per forward: (storage, offset, shape, stride, version) -> (tensor ref, _Saved)
        self.offloaded_bytes = 0  # of the last forward, for reports and tests
        self.fetched_late = 0  # saved tensors a backward needed before their prefetch was issued

    @contextlib.contextmanager
    def forward(self):
        """Around one forward: its saved tensors pass through the hooks (nothing happens without grad, nor in a
        forward whose result is detached, `speed.head_without_grad`: DPO's reference through the policy's graph,
        whose saved tensors are dropped with no backward)."""
        from align import speed

        if not torch.is_grad_enabled() or speed.forward_is_detached():
            yield
            return
        self._sent, self._seen, self._full = 0, {}, False
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        self.offloaded_bytes, self._seen = self._sent, {}

    def _weight_storages(self):
        if self._weights is None:
            tensors = list(self.model.parameters()) + list(self.model.buffers())
            self._weights = {t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta"}
        return self._weights

    def _side(self, device, way: str):
        """The side stream of `device` for copies one `way` ("out" to the host, "back"): one each, so that the
        first layers' copies back overlap the copies out of a later forward (PCIe runs both ways at once)."""
        if (device, way) not in self._streams:
            self._streams[device, way] = torch.cuda.Stream(device)
        return self._streams[device, way]

    def _pack(self, t):
        nbytes = t.numel() * t.element_size()
        storage = t.untyped_storage()
        if storage.data_ptr() in self._weight_storages():
            return _Saved(self._pos, device=t)
        self._pos += nbytes
        pos = self._pos
        if (self._full or t.device.type not in self.device_types or nbytes < self.min_bytes
                or storage.nbytes() != nbytes or not t.is_contiguous()):
            return _Saved(pos, device=t)
        if self._sent + nbytes > self.max_bytes:  # the rest of this forward stays: the earliest tensors go first
            self._full = True
            return _Saved(pos, device=t)
        key = (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version, t.dtype)
        seen = self._seen.get(key)
        if seen is not None and seen[0]() is not None:  # the same tensor saved by a second op (eager layers): one copy
            return seen[1]
        sent = None
        if t.device.type == "cuda":
            side = self._side(t.device, "out")
            side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(side):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                sent = torch.cuda.Event()
                sent.record(side)
            t.record_stream(side)  # its memory is reused only after the copy
        else:
            host = t.detach().clone()
        saved = _Saved(pos, host=host, sent=sent)
        self._seen[key] = (weakref.ref(t), saved)  # a live tensor: its memory is not yet another tensor's
        self._live[pos] = saved
        self._waiting.append(pos)
        self._sent += nbytes
        return saved

    def _unpack(self, saved):
        self.fetched_late += saved.device is None
        self._prefetch(saved.pos)
        if saved.ready is not None:
            torch.cuda.current_stream(saved.device.device).wait_event(saved.ready)
            saved.ready = None
        return saved.device

    def _prefetch(self, pos):
        """Issue the copies back of every waiting tensor saved less than `ahead_bytes` of activations before the one
        at `pos` that this backward unpacks now (and of any saved after it): the backward's place in the forward is
        its clock, so the first layers' tensors come back as the backward nears them, not at its start, where the
        step's peak is."""
        waiting = self._waiting
        cut = bisect.bisect_left(waiting, pos - self.ahead_bytes)
        for i in waiting[cut:]:
            saved = self._live.get(i)
            if saved is not None:
                self._fetch(saved)
        self._waiting = waiting[:cut]

    def _fetch(self, saved):
        host = saved.host
        if host.device.type == "cpu" and host.is_pinned():
            device = torch.device("cuda", torch.cuda.current_device())
            side = self._side(device, "back")
            with torch.cuda.stream(side):
                side.wait_event(saved.sent)  # the copy out is done
                back = torch.empty(host.shape, dtype=host.dtype, device=device)
                back.copy_(host, non_blocking=True)
                saved.ready = torch.cuda.Event()
                saved.ready.record(side)
            back.record_stream(torch.cuda.current_stream(device))  # used by the backward on the compute stream
        else:
            back = host.clone()
        saved.device, saved.host, saved.sent = back, None, None


def use_offload(model, max_gib: float | None = None, **kwargs) -> ActivationOffload:
    """Put activation offloading around the backbone's forward of `model` (a transformers causal LM, under PEFT or
    not); `max_gib` per forward (default `MAX_GIB`); `kwargs` go to `ActivationOffload`."""
    from align.speed import _causal_lm

    lm = _causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    gib = MAX_GIB if max_gib is None else max_gib
    hooks = ActivationOffload(lm, max_bytes=int(gib * GIB), **kwargs)
    inner = backbone.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with hooks.forward():
            return inner(*args, **kwargs)

    backbone.forward = forward
    backbone.align_offload = hooks
    logger.info("speedups: offload of up to %.2f GiB of saved activations per forward to pinned host memory", gib)
    return hooks
