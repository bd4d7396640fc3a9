"""llmcad.streaming.gpu_upload bookkeeping on the CPU: the upload ring and the device feed with stub streams and
events (the same calls CUDA gets), and the streamed target's GPU hooks driven through them end to end.
The real device runs are tests/test_gpu.py (cuda marker)."""
import contextlib
import itertools

import numpy as np
import pytest
import torch

from llmcad.streaming import gpu_upload

from llmcad.streaming import streamed
from llmcad.streaming.budget import plan_placement
from llmcad.streaming.gpu_upload import DeviceFeed, UploadRing, resolve_gpu_path, typed_view
from llmcad.streaming.streamed import load_streamed_target
from llmcad.streaming.weights import load_index
from tiny_models import build_tiny, load_resident


class FakeEvent:
    """A CUDA event stand-in: complete only when the test (the 'GPU') says so, or on synchronize."""

    ids = itertools.count()

    def __init__(self, log):
        self.log, self.id, self.done, self.stream = log, next(FakeEvent.ids), False, None

    def record(self, stream):
        self.stream, self.done = stream.name, False
        self.log.append(("record", stream.name, self.id))

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True
        self.log.append(("sync", self.id))


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.id))

    def synchronize(self):
        self.log.append(("stream-sync", self.name))


class FakeOps:
    def __init__(self, device=None):
        self.log, self.events = [], []
        self.compute = FakeStream("compute", self.log)
        self.current = None  # the stream inside use_stream

    def new_stream(self):
        return FakeStream("side", self.log)

    def new_event(self):
        event = FakeEvent(self.log)
        self.events.append(event)
        return event

    def current_stream(self):
        return self.compute

    @contextlib.contextmanager
    def use_stream(self, stream):
        self.log.append(("enter", stream.name))
        yield
        self.log.append(("exit", stream.name))

    def finish_all(self):
        for event in self.events:
            event.done = True


class FakeView:
    def __init__(self, data):
        self.array = np.frombuffer(bytes(data), dtype=np.uint8).copy()
        self.offsets, self.lengths = [0], [len(data)]


class FakeHostRing:
    """The streamer's acquire/release contract: FIFO order, at most ``buffers`` held."""

    def __init__(self, layers, buffers=2):
        self.layers, self.buffers = layers, buffers
        self.held, self.max_held, self.log = [], 0, []

    def acquire(self, layer):
        if len(self.held) >= self.buffers:
            raise ValueError("acquiring while every buffer is held")
        self.held.append(layer)
        self.max_held = max(self.max_held, len(self.held))
        self.log.append(("acquire", layer))
        return FakeView(self.layers[layer])

    def release(self, layer):
        if layer not in self.held:
            raise ValueError(f"release of layer {layer} not held")
        self.held.remove(layer)
        self.log.append(("release", layer))


def _layer_bytes(n):
    return {i: bytes(range(i * 10, i * 10 + 16)) for i in range(n)}


def test_ring_orders_uploads_and_compute_with_events():
    ops = FakeOps()
    ring = UploadRing(32, "cpu", num_slots=2, ops=ops)
    released = []
    ring.upload("a", torch.arange(16, dtype=torch.uint8), on_copied=lambda: released.append("a"))
    ready_a = ops.events[-1]
    assert ("enter", "side") in ops.log and ("record", "side", ready_a.id) in ops.log
    assert released == []  # the copy has not finished yet
    got = ring.take("a")
    assert ops.log[-1] == ("wait", "compute", ready_a.id)  # compute waits for the upload
    assert torch.equal(got, torch.arange(16, dtype=torch.uint8))
    ring.done("a")
    free_a = ops.events[-1]
    assert ops.log[-1] == ("record", "compute", free_a.id)
    ring.upload("b", torch.ones(8, dtype=torch.uint8))
    assert ("wait", "side", free_a.id) not in ops.log  # slot 1 was never used
    ring.take("b")
    ring.done("b")
    ready_a.done = True
    ring.poll()
    assert released == ["a"]  # host buffer back once its copy finished
    ring.upload("c", torch.full((4,), 7, dtype=torch.uint8))
    waits = [entry for entry in ops.log if entry[0] == "wait" and entry[1] == "side"]
    assert waits == [("wait", "side", free_a.id)]  # slot 0 reused only after layer a's compute
    assert torch.equal(ring.take("c"), torch.full((4,), 7, dtype=torch.uint8))


def test_ring_refuses_misuse():
    ring = UploadRing(8, "cpu", num_slots=1, ops=FakeOps())
    with pytest.raises(ValueError, match="9 bytes"):
        ring.upload(0, torch.zeros(9, dtype=torch.uint8))
    ring.upload(0, torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="still holds layer 0"):
        ring.upload(1, torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(KeyError):
        ring.take(5)
    with pytest.raises(ValueError):
        UploadRing(8, "cpu", num_slots=0, ops=FakeOps())


@pytest.mark.parametrize("gpu_finishes", [True, False])
def test_copy_feed_uploads_next_layer_from_the_previous_hook(gpu_finishes):
    layers = _layer_bytes(5)
    host = FakeHostRing(layers, buffers=2)
    ops = FakeOps()
    feed = DeviceFeed("copy", "cpu", acquire=host.acquire, release=host.release, host_buffers=2,
                      slot_bytes=16, ops=ops, read_ready=lambda: True)
    order = list(range(5))
    for k, layer in enumerate(order):
        got = feed.begin(layer)
        assert bytes(got.raw.numpy()) == layers[layer]
        nxt = order[k + 1] if k + 1 < len(order) else None
        feed.end(layer, nxt)
        if nxt is not None and (gpu_finishes or k == 0):  # a free host buffer: no wait to queue it
            assert host.log[-1] == ("acquire", nxt) or ("acquire", nxt) in host.log[-3:]
            assert feed.uploaded(nxt)  # queued from layer's hook, before its own pre-hook
        if gpu_finishes:
            ops.finish_all()
    feed.finish_pass()
    assert host.held == [] and host.max_held <= 2
    assert feed.ring.uploads == 5 and feed.stats()["bytes_uploaded"] == 80
    assert [e for e in host.log if e[0] == "acquire"] == [("acquire", i) for i in order]


def test_zero_copy_feed_releases_after_compute(monkeypatch):
    monkeypatch.setattr(gpu_upload, "zero_copy_bytes", lambda view, device: torch.from_numpy(view.array))
    layers = _layer_bytes(4)
    host = FakeHostRing(layers, buffers=2)
    ops = FakeOps()
    feed = DeviceFeed("zero-copy", "cpu", acquire=host.acquire, release=host.release, host_buffers=2, ops=ops)
    assert feed.device_bytes == 0
    feed.begin(0)
    feed.end(0, 1)
    assert host.held == [0]  # still read by layer 0's kernels
    ops.events[-1].done = True
    feed.begin(1)
    feed.end(1, 2)
    assert host.held == [0, 1] or host.held == [1]
    feed.begin(2)  # a third layer: the oldest buffer is waited for and given back first
    assert host.max_held <= 2
    feed.end(2, 3)
    feed.finish_pass()
    assert host.held == []


def test_feed_reset_forgets_everything():
    layers = _layer_bytes(3)
    host = FakeHostRing(layers, buffers=2)
    ops = FakeOps()
    feed = DeviceFeed("copy", "cpu", acquire=host.acquire, release=host.release, host_buffers=2,
                      slot_bytes=16, ops=ops)
    feed.begin(0)
    feed.end(0, 1)
    feed.reset()
    assert ("stream-sync", "side") in ops.log and ("stream-sync", "compute") in ops.log
    assert not feed.uploaded(1) and feed.host_held() == 0
    with pytest.raises(ValueError):
        DeviceFeed("bogus", "cpu", acquire=host.acquire, release=host.release, host_buffers=2)


def test_resolve_gpu_path():
    assert resolve_gpu_path("auto", "cpu") is None
    assert resolve_gpu_path("zero-copy", "cpu") is None
    with pytest.raises(ValueError, match="gpu_path"):
        resolve_gpu_path("fast", "cpu")


def test_typed_view_is_zero_copy_when_aligned():
    raw = torch.arange(64, dtype=torch.uint8)
    view = typed_view(raw, 8, 16, torch.float32, (2, 2))
    assert view.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()
    assert torch.equal(view, raw[8:24].clone().view(torch.float32).view(2, 2))
    odd = typed_view(raw, 3, 8, torch.float32, (2,))  # misaligned: a copy with the same bytes
    assert torch.equal(odd.view(torch.uint8), raw[3:11])
    with pytest.raises(ValueError, match="cannot hold"):
        typed_view(raw, 0, 10, torch.float32, (2,))
    assert typed_view(raw, 0, 0, torch.float32, (0, 3)).shape == (0, 3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("gpu_feed") / "qwen2", num_layers=4, seed=3)


@pytest.mark.parametrize("path", ["copy", "zero-copy"])
def test_streamed_target_through_the_feed_is_bit_identical(checkpoint, monkeypatch, path):
    """The streamed target's hooks with the GPU feed on a stub 'device' (CPU tensors): same logits as
    the in-memory model over several passes, every host buffer given back after each pass."""
    monkeypatch.setattr(streamed, "resolve_gpu_path", lambda gpu_path, device: gpu_path)
    monkeypatch.setattr(gpu_upload, "CudaOps", FakeOps)
    monkeypatch.setattr(gpu_upload, "zero_copy_bytes", lambda view, device: torch.from_numpy(view.array))
    placement = plan_placement(load_index(checkpoint), memory_budget="1GiB", max_resident_layers=1, num_buffers=2)
    target = load_streamed_target(checkpoint, placement=placement, streamer_options={"gpu_path": path})
    model = target.model
    ref = load_resident(checkpoint)
    ctl = target
    try:
        assert ctl.gpu_path == path
        ids = torch.tensor([[5, 9, 2, 7, 1]])
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
                assert ctl.stats()["gpu"]["host_held"] == 0
        if path == "copy":
            assert ctl.stats()["gpu"]["uploads"] == 3 * len(placement.streamed_layers)
    finally:
        ctl.close()


def test_failed_pass_resets_the_feed(checkpoint, monkeypatch):
    monkeypatch.setattr(streamed, "resolve_gpu_path", lambda gpu_path, device: gpu_path)
    monkeypatch.setattr(gpu_upload, "CudaOps", FakeOps)
    placement = plan_placement(load_index(checkpoint), memory_budget="1GiB", max_resident_layers=0, num_buffers=2)
    target = load_streamed_target(checkpoint, placement=placement, streamer_options={"gpu_path": "copy"})
    model = target.model
    ref = load_resident(checkpoint)
    layer = streamed.decoder_layers(model)[2]
    fail = {"once": True}

    def boom(module, args):
        if fail.pop("once", False):
            raise RuntimeError("injected")

    handle = layer.register_forward_pre_hook(boom)
    ids = torch.tensor([[3, 4, 5]])
    try:
        with pytest.raises(RuntimeError, match="injected"), torch.no_grad():
            model(input_ids=ids)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    finally:
        handle.remove()
        target.close()


def test_copy_feed_never_waits_for_a_read_outside_begin():
    """end() queues the next upload only when that waits for nothing: a read still running is left to
    the next layer's begin(), where the pipeline's compute gate surrounds the wait."""
    layers = _layer_bytes(4)
    host = FakeHostRing(layers, buffers=2)
    ops = FakeOps()
    ready = {"read": False}
    feed = DeviceFeed("copy", "cpu", acquire=host.acquire, release=host.release, host_buffers=2,
                      slot_bytes=16, ops=ops, read_ready=lambda: ready["read"])
    feed.begin(0)
    feed.end(0, 1)
    assert ("acquire", 1) not in host.log and not feed.uploaded(1)  # read not finished: no wait here
    assert bytes(feed.begin(1).raw.numpy()) == layers[1]  # the wait happens in begin
    ready["read"] = True
    feed.end(1, 2)
    assert not feed.uploaded(2)  # both host buffers still read by copies: queuing would wait for the GPU
    ops.finish_all()
    assert bytes(feed.begin(2).raw.numpy()) == layers[2]
    feed.end(2, 3)
    assert feed.uploaded(3) and feed.early_uploads == 1  # finished read, free host buffer: queued at once
    feed.begin(3)
    feed.end(3, None)
    feed.finish_pass()
    assert host.held == [] and feed.stats()["uploads"] == 4


SLOW_IO = {"bandwidth_cap": 2e6}  # bytes/s: a tiny layer (~50 KB) takes ~25 ms, far longer than a draft step


def test_copy_path_drafts_during_every_host_read(tiny_pair_dirs, tiny_models, tiny_tokenizer, monkeypatch):
    """The copy path through the engine on stub streams, pipelined, with slow reads: the compute gate
    sees the host read of every streamed layer (not only the first of a pass), the draft drafts
    provisionally during them, and the output is the target's own greedy output."""
    from llmcad import LLMCad
    from llmcad.speculative import pipeline
    from llmcad.speculative.policy import make_policy

    monkeypatch.setattr(streamed, "resolve_gpu_path", lambda gpu_path, device: gpu_path)
    monkeypatch.setattr(gpu_upload, "CudaOps", FakeOps)
    waits = {"asked": 0, "handed": 0, "ema_samples": 0}
    original_wait, original_resume = pipeline.ComputeGate.target_waits_for_io, pipeline.ComputeGate.target_resumes

    def counting_wait(gate, ready):
        waits["asked"] += 1
        handed = original_wait(gate, ready)
        waits["handed"] += handed
        return handed

    def counting_resume(gate):
        waits["ema_samples"] += gate._io_waiting
        return original_resume(gate)

    monkeypatch.setattr(pipeline.ComputeGate, "target_waits_for_io", counting_wait)
    monkeypatch.setattr(pipeline.ComputeGate, "target_resumes", counting_resume)
    dirs = tiny_pair_dirs("qwen2")
    placement = plan_placement(load_index(dirs["target"]), memory_budget="1GiB", max_resident_layers=0,
                               num_buffers=2)
    target = load_streamed_target(dirs["target"], placement=placement,
                                  streamer_options={"gpu_path": "copy", **SLOW_IO})
    prompt = "def add(a, b):"
    ids = tiny_tokenizer(prompt)["input_ids"]
    want = tiny_models("qwen2", "target").generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                   dtype=torch.long), max_new_tokens=12, do_sample=False)
    try:
        engine = LLMCad(tiny_models("qwen2", "same"), target.model, tiny_tokenizer, make_policy("llmcad"),
                        streamed=target, pipeline=True)
        result = engine.generate(ids, 12)
        assert result.tokens == want[0, len(ids):].tolist()
        layers = len(placement.streamed_layers)
        passes = target.passes
        assert waits["asked"] == passes * layers
        # every layer beyond the host buffers prefetched between passes waits for its read in the gate
        assert waits["handed"] >= passes * (layers - placement.num_buffers), waits
        assert waits["ema_samples"] == waits["handed"]
        assert result.stats["provisional_drafted"] > 0
        assert target.stats()["gpu"]["uploads"] == target.passes * layers
    finally:
        target.close()


def test_device_ring_is_budgeted_and_reported(checkpoint, monkeypatch):
    """The copy path's device slots count in the placement's budget and in the target's memory."""
    index = load_index(checkpoint)
    plain = plan_placement(index, memory_budget="1GiB", max_resident_layers=0, num_buffers=2)
    with_ring = plan_placement(index, memory_budget="1GiB", max_resident_layers=0, num_buffers=2,
                               device_slots=gpu_upload.DEVICE_SLOTS)
    ring = with_ring.accounting["device_ring"]
    assert plain.accounting["device_ring"] == 0 and ring >= 2 * max(index.layer_bytes(i) for i in range(4))
    assert with_ring.accounting["total"] == plain.accounting["total"] + ring
    monkeypatch.setattr(streamed, "resolve_gpu_path", lambda gpu_path, device: gpu_path)
    monkeypatch.setattr(gpu_upload, "CudaOps", FakeOps)
    target = load_streamed_target(checkpoint, placement=with_ring, streamer_options={"gpu_path": "copy"})
    try:
        stats = target.stats()
        assert stats["device_ring_bytes"] == stats["gpu"]["device_bytes"] > 0
        assert target.memory_bytes == stats["resident_bytes"] + stats["streamer"]["memory_bytes"] + \
            stats["device_ring_bytes"]
    finally:
        target.close()


def test_budgeted_copy_path_reserves_the_device_ring(tiny_pair_dirs, tiny_models, monkeypatch):
    """load_budgeted_target on a (stub) discrete GPU: the smallest budget grows by the device slots."""
    from llmcad.errors import BudgetError
    from llmcad.streaming.streamed import load_budgeted_target

    monkeypatch.setattr(streamed, "resolve_gpu_path", lambda gpu_path, device: gpu_path)
    target_dir, draft = tiny_pair_dirs("qwen2")["target"], tiny_models("qwen2", "same")
    needs = {}
    for path in ("zero-copy", "copy"):
        with pytest.raises(BudgetError) as err:
            load_budgeted_target(target_dir, memory_budget=1, draft_model=draft, streamer_options={"gpu_path": path})
        needs[path] = int(err.value.args[0].split("(")[2].split(" bytes")[0])
        assert f"{gpu_upload.DEVICE_SLOTS if path == 'copy' else 0} device slots" in err.value.args[0]
    index = load_index(target_dir)
    largest = max(index.layer_bytes(i) for i in range(index.num_layers))
    assert needs["copy"] - needs["zero-copy"] >= gpu_upload.DEVICE_SLOTS * largest
