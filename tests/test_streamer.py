"""Weight streamer: byte-exact layers for every backend, ordering rules, faults, leaks, tmpfs."""
import errno
import gc
import os
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcad import build_info
from llmcad.errors import StreamerIOError
from llmcad.streaming.streamer import (WeightStreamer, buffer_bytes_for, evict_from_page_cache, layout_bytes,
                                      memory_bytes, raw_direct_read_gbps)

from clocks import loads_within

SIZES = (300_001, 200_003)  # odd sizes: the aligned tail of a direct read runs past end of file


def _backends():
    out = [pytest.param("pread", id="pread")]
    uring = pytest.mark.skipif(not build_info()["io_uring_available"], reason="io_uring not available here")
    out.append(pytest.param("io_uring", id="io_uring", marks=uring))
    return out


BACKENDS = _backends()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two random-bytes files; returns (paths, contents)."""
    d = tmp_path_factory.mktemp("streamer")
    rng = np.random.default_rng(0)
    paths, blobs = [], []
    for i, size in enumerate(SIZES):
        blob = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        p = d / f"w{i}.bin"
        p.write_bytes(blob)
        paths.append(str(p))
        blobs.append(blob)
    return paths, blobs


def plain_read(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def assert_layer(view, ranges, paths):
    for i, (fi, off, n) in enumerate(ranges):
        got = view.range_bytes(i).tobytes()
        assert got == plain_read(paths[fi], off, n), f"range {i} {(fi, off, n)} differs"


# Unaligned offsets and lengths, adjacent ranges, a range up to end of file, ranges in both files.
LAYERS = [
    [(0, 1, 4095), (0, 4096, 4097), (0, 8193, 12345)],
    [(1, 17, 70_000), (0, 100_003, 9)],
    [(0, 299_000, 1_001), (1, 199_999, 4)],  # both end exactly at end of file
    [(1, 5, 0), (1, 123_457, 33_333), (1, 4096 * 10, 4096)],
    [(0, 150_000, 120_000)],
]


def stream_all(s, layer_ids, ahead):
    """Pipeline: keep `ahead` layers prefetched, acquire in order, yield each view, release."""
    for i in layer_ids[:ahead]:
        s.prefetch(i)
    for k, i in enumerate(layer_ids):
        view = s.acquire(i)
        yield i, view
        s.release(i)
        if k + ahead < len(layer_ids):
            s.prefetch(layer_ids[k + ahead])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_buffers", [1, 2, 4])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_layers_byte_identical(files, backend, num_buffers, direct):
    paths, _ = files
    with WeightStreamer(paths, buffer_bytes=200_000, num_buffers=num_buffers, backend=backend, direct=direct,
                        queue_depth=4, chunk_bytes=8192) as s:
        assert s.backend == backend and s.direct == direct
        ids = [s.add_layer(r) for r in LAYERS]
        order = ids + ids[::-1] + ids  # layers come back again, as in the next forward pass
        for i, view in stream_all(s, order, num_buffers):
            assert_layer(view, LAYERS[i], paths)
            for off, (_, file_off, n) in zip(view.offsets, LAYERS[i]):
                assert n == 0 or off % 4096 == file_off % 4096  # alignment inside the buffer is kept
        st_ = s.stats()
        assert st_["layers_loaded"] == len(order) and st_["errors"] == 0
        assert st_["bytes_read"] >= sum(s.layer_bytes(i) for i in order)
        assert st_["memory_bytes"] == num_buffers * st_["buffer_bytes"] >= num_buffers * 200_000


@pytest.mark.parametrize("backend", BACKENDS)
def test_acquire_without_prefetch_and_torch_view(files, backend):
    torch = pytest.importorskip("torch")
    paths, _ = files
    with WeightStreamer(paths, buffer_bytes=1 << 16, backend=backend) as s:
        lid = s.add_layer([(0, 4, 4 * 1000), (1, 8, 4 * 6)])
        view = s.acquire(lid)
        t = view.tensor(0, torch.float32, (10, 100))
        want = np.frombuffer(plain_read(paths[0], 4, 4000), dtype=np.float32).reshape(10, 100)
        assert np.array_equal(t.numpy(), want, equal_nan=True)
        assert t.data_ptr() == view.ptr + view.offsets[0]  # zero copy
        assert view.tensor(1, torch.int16, (3, 4)).shape == (3, 4)
        with pytest.raises(ValueError, match="needs"):
            view.tensor(1, torch.float32, (7,))
        s.release(lid)


def test_misuse_raises_value_error_naming_the_problem(files):
    paths, _ = files
    s = WeightStreamer(paths, buffer_bytes=1 << 16, num_buffers=1, backend="pread")
    a, b = s.add_layer([(0, 0, 100)]), s.add_layer([(1, 0, 100)])
    s.prefetch(a)
    s.prefetch(b)
    with pytest.raises(ValueError, match="out of order"):
        s.acquire(b)
    s.acquire(a)
    with pytest.raises(ValueError, match="buffers are held"):
        s.acquire(b)  # its read could never start: the only buffer is held
    s.release(a)
    with pytest.raises(ValueError, match="not acquired"):
        s.release(a)  # double release
    s.acquire(b)
    s.release(b)
    with pytest.raises(ValueError, match="unknown layer id 7"):
        s.prefetch(7)
    with pytest.raises(ValueError, match="file index 5"):
        s.add_layer([(5, 0, 1)])
    with pytest.raises(ValueError, match="negative"):
        s.add_layer([(0, -1, 1)])
    with pytest.raises(ValueError, match="raise buffer_bytes"):
        s.add_layer([(0, 0, 200_000)])
    s.close()
    s.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        s.acquire(a)
    with pytest.raises(ValueError, match="backend"):
        WeightStreamer(paths, buffer_bytes=4096, backend="aio")
    with pytest.raises(ValueError, match="chunk_bytes"):
        WeightStreamer(paths, buffer_bytes=4096, chunk_bytes=1000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_eio_then_next_use_is_clean(files, backend):
    paths, _ = files
    with WeightStreamer(paths, buffer_bytes=1 << 17, backend=backend, chunk_bytes=4096, queue_depth=8) as s:
        lid = s.add_layer(LAYERS[1])
        s.inject_fault(3, errno.EIO)  # a read in the middle of the layer
        with pytest.raises(StreamerIOError, match="Input/output error") as info:
            s.acquire(lid)
        assert info.value.errno == errno.EIO and isinstance(info.value, OSError)
        assert paths[1] in str(info.value) and "offset" in str(info.value)
        assert s.stats()["errors"] == 1
        view = s.acquire(lid)  # the failed request was consumed; the next one is clean
        assert_layer(view, LAYERS[1], paths)
        s.release(lid)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_records_and_readiness(files, backend):
    """Every finished load is recorded by the IO thread, in FIFO order, on the perf_counter clock;
    next_ready() says whether the next acquire would wait."""
    paths, _ = files
    with WeightStreamer(paths, buffer_bytes=200_000, num_buffers=2, backend=backend, chunk_bytes=4096) as s:
        ids = [s.add_layer(r) for r in LAYERS]
        assert not s.next_ready() and s.loads_finished == 0 and s.loads_since(0) == []
        t0 = time.perf_counter()
        s.prefetch(ids[0])
        deadline = time.monotonic() + 30
        while not s.next_ready() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert s.next_ready()
        s.acquire(ids[0])
        s.release(ids[0])
        assert not s.next_ready()  # nothing queued
        order = ids + ids[:2]
        for _ in stream_all(s, order[1:], 2):
            pass
        t1 = time.perf_counter()
        mark = s.loads_finished
        s.inject_fault(0, errno.EIO)
        with pytest.raises(StreamerIOError):
            s.acquire(ids[1])
        records = s.loads_since(0)
        assert [r.seq for r in records] == list(range(len(order) + 1))
        assert [r.layer_id for r in records] == order + [ids[1]]
        assert all(r.ok for r in records[:-1]) and not records[-1].ok
        assert loads_within(records[:-1], t0, t1)
        assert [r.bytes for r in records[:3]] == [s.layer_bytes(i) for i in ids[:3]]
        assert s.loads_since(mark) == records[-1:] and s.loads_finished == mark + 1
        assert not s.next_ready()


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_buffered_read_is_an_error_naming_file_and_offset(files, backend):
    paths, _ = files
    with WeightStreamer(paths, buffer_bytes=1 << 17, backend=backend, direct=False) as s:
        lid = s.add_layer([(0, 12_345, 1000)])
        s.inject_fault(0, errno.EINVAL)  # e.g. a misaligned read; no O_DIRECT to fall back from
        with pytest.raises(StreamerIOError, match="offset 12345 failed: Invalid argument") as info:
            s.acquire(lid)
        assert info.value.errno == errno.EINVAL and paths[0] in str(info.value)
        assert_layer(s.acquire(lid), [(0, 12_345, 1000)], paths)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_truncated_after_indexing_then_next_use_is_clean(tmp_path, backend, direct):
    path = tmp_path / "t.bin"
    blob = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    path.write_bytes(blob)
    with WeightStreamer([path], buffer_bytes=1 << 17, backend=backend, direct=direct, chunk_bytes=8192) as s:
        tail, head = s.add_layer([(0, 50_000, 50_000)]), s.add_layer([(0, 10, 30_000)])
        os.truncate(path, 60_001)
        with pytest.raises(StreamerIOError, match="end of file") as info:
            s.acquire(tail)
        assert info.value.errno == errno.EIO and str(path) in str(info.value)
        view = s.acquire(head)
        assert view.range_bytes(0).tobytes() == blob[10:30_010]
        s.release(head)


def test_missing_file_names_it_then_next_use_is_clean(files, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(StreamerIOError, match="No such file") as info:
        WeightStreamer([files[0][0], missing], buffer_bytes=4096)
    assert info.value.errno == errno.ENOENT and str(missing) in str(info.value)
    with WeightStreamer(files[0], buffer_bytes=4096) as s:
        lid = s.add_layer([(0, 1, 10)])
        assert s.acquire(lid).range_bytes(0).tobytes() == plain_read(files[0][0], 1, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_consumer_raises_midway_reset_and_close_never_hang(files, backend):
    paths, _ = files
    done = threading.Event()

    def consumer():
        s = WeightStreamer(paths, buffer_bytes=1 << 17, num_buffers=2, backend=backend,
                           bandwidth_cap=20e6, chunk_bytes=8192)
        ids = [s.add_layer(r) for r in LAYERS]
        for i in ids:
            s.prefetch(i)
        s.acquire(ids[0])  # held, others queued or loading; the consumer "raises" here
        s.reset()
        view = s.acquire(ids[2])  # after reset the ring starts empty: any layer may come next
        assert_layer(view, LAYERS[2], paths)
        for i in ids:
            s.prefetch(i)
        s.acquire(ids[0])
        del s  # destroyed with a layer held and reads in flight
        gc.collect()
        done.set()

    t = threading.Thread(target=consumer, daemon=True)
    t.start()
    t.join(30)
    assert done.is_set(), "streamer reset/destruction hung or failed"


def test_view_outlives_close(files):
    paths, _ = files
    s = WeightStreamer(paths, buffer_bytes=1 << 16, backend="pread")
    lid = s.add_layer([(0, 7, 1000)])
    view = s.acquire(lid)
    s.close()
    del s
    gc.collect()
    assert view.range_bytes(0).tobytes() == plain_read(paths[0], 7, 1000)  # memory kept by the view


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_cycles_leak_nothing(files, backend):
    paths, _ = files

    def cycle(n_streamers, n_layers):
        for _ in range(n_streamers):
            with WeightStreamer(paths, buffer_bytes=1 << 17, backend=backend) as s:
                ids = [s.add_layer(r) for r in LAYERS]
                order = ids * (n_layers // len(ids))
                for _, view in stream_all(s, order, 2):
                    del view

    cycle(3, 20)  # warm up allocator and caches
    gc.collect()
    fds, rss = _fd_count(), _rss_bytes()
    cycle(30, 200)
    gc.collect()
    assert _fd_count() == fds
    assert _rss_bytes() - rss < 16 << 20, "RSS grew by more than 16 MiB over 30 streamers x 200 layers"


def _o_direct_refused(path):
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return False
    except OSError as exc:
        return exc.errno == errno.EINVAL


def test_tmpfs_reads_buffered_with_one_warning_where_o_direct_is_refused():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = f"/dev/shm/llmcad_streamer_test_{os.getpid()}.bin"
    blob = os.urandom(50_000)
    with open(path, "wb") as f:
        f.write(blob)
    try:
        refused = _o_direct_refused(path)  # tmpfs accepts O_DIRECT since Linux 6.6
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            s = WeightStreamer([path], buffer_bytes=1 << 16, direct=True)
            with s:
                assert s.direct is not refused
                lid = s.add_layer([(0, 3, 40_000)])
                assert s.acquire(lid).range_bytes(0).tobytes() == blob[3:40_003]
                s.release(lid)
                s.acquire(lid)
        ours = [w for w in record if "O_DIRECT" in str(w.message)]
        assert len(ours) == (1 if refused else 0)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_o_direct_refused_at_first_read_falls_back_with_one_warning(files, backend):
    paths, _ = files
    with WeightStreamer(paths, buffer_bytes=1 << 17, backend=backend, direct=True) as s:
        assert s.direct
        lid = s.add_layer(LAYERS[1])
        s.inject_fault(0, errno.EINVAL)  # what a filesystem refusing O_DIRECT reads answers
        with pytest.warns(RuntimeWarning, match="O_DIRECT read refused") as record:
            view = s.acquire(lid)
        assert len(record) == 1
        assert_layer(view, LAYERS[1], paths)
        s.release(lid)
        assert not s.direct and s.stats()["errors"] == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            assert_layer(s.acquire(lid), LAYERS[1], paths)


def test_bandwidth_cap_slows_reads(files):
    paths, _ = files
    with WeightStreamer(paths, buffer_bytes=1 << 18, bandwidth_cap=2e6, chunk_bytes=8192, direct=False) as s:
        lid = s.add_layer([(0, 0, 200_000)])
        t0 = time.perf_counter()
        s.acquire(lid)
        # 200 kB at 2 MB/s is 0.1 s; the bucket allows a 20 ms burst. A lower bound only.
        assert time.perf_counter() - t0 >= 0.06


def test_helpers(files):
    paths, _ = files
    assert layout_bytes([(0, 1, 10)]) == 4096
    assert layout_bytes([(0, 4095, 2)]) == 8192
    assert layout_bytes([(0, 0, 4096), (0, 4096, 1), (1, 0, 1)]) == 3 * 4096
    evict_from_page_cache(paths[0])
    assert raw_direct_read_gbps(paths[0], 1 << 16) > 0
    with pytest.raises(StreamerIOError):
        evict_from_page_cache(paths[0] + ".missing")


@st.composite
def layer_specs(draw):
    n = draw(st.integers(1, 5))
    ranges = []
    for _ in range(n):
        fi = draw(st.integers(0, 1))
        off = draw(st.integers(0, SIZES[fi] - 1))
        length = draw(st.integers(0, min(SIZES[fi] - off, 60_000)))
        ranges.append((fi, off, length))
    return ranges


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(layer_specs(), min_size=1, max_size=4), direct=st.booleans(),
       backend=st.sampled_from(["pread", "io_uring"]), num_buffers=st.integers(1, 3),
       chunk_kib=st.sampled_from([4, 12, 1024]), queue_depth=st.sampled_from([1, 3]))
def test_random_ranges_byte_identical(files, layers, direct, backend, num_buffers, chunk_kib, queue_depth):
    if backend == "io_uring" and not build_info()["io_uring_available"]:
        backend = "pread"
    paths, _ = files
    need = max(1, max(layout_bytes(r) for r in layers))
    with WeightStreamer(paths, buffer_bytes=need, num_buffers=num_buffers, backend=backend, direct=direct,
                        chunk_bytes=chunk_kib * 1024, queue_depth=queue_depth) as s:
        ids = [s.add_layer(r) for r in layers]
        for i, view in stream_all(s, ids, num_buffers):
            assert_layer(view, layers[i], paths)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranges=layer_specs(), num_buffers=st.integers(1, 3))
def test_sizes_the_budget_plans_with_are_the_streamers(files, ranges, num_buffers):
    """buffer_bytes_for() is a size whose buffers hold the layer (4096 bytes less does not, unless
    that is below the payload); memory_bytes() is what the streamer allocates."""
    paths, _ = files
    need = buffer_bytes_for(ranges, len(paths))
    payload = sum(length for _, _, length in ranges)
    assert need >= max(payload, 1)
    with WeightStreamer(paths, buffer_bytes=need, num_buffers=num_buffers, backend="pread") as s:
        s.add_layer(ranges)
        assert s.memory_bytes == memory_bytes(need, num_buffers, len(paths)) == num_buffers * s.stats()["buffer_bytes"]
        assert s.stats()["buffer_bytes"] >= layout_bytes(ranges)
    smaller = need - 4096
    if smaller >= max(payload, 1):
        with WeightStreamer(paths, buffer_bytes=smaller, backend="pread") as s, \
                pytest.raises(ValueError, match="raise buffer_bytes"):
            s.add_layer(ranges)


@pytest.mark.parametrize("overlap", [False, True], ids=["throughput", "overlap"])
def test_bench_streamer_json_and_cleanup(tmp_path, capsys, overlap):
    import json

    from llmcad.bench import streamer_bench as bench_streamer

    argv = ["--size", "6MiB", "--layer-bytes", "1MiB", "--repeats", "1", "--dir", str(tmp_path), "--json"]
    assert bench_streamer.main(argv + (["--overlap", "--passes", "1"] if overlap else [])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["backend"] for r in records] == (["pread", "io_uring"] if build_info()["io_uring_available"] else ["pread"])
    keys = {"io_s", "compute_s", "overlap_s", "ratio"} if overlap else {
        "backend", "direct", "buffers", "streamer_gbps", "raw_gbps", "ratio"}
    for r in records:
        assert keys <= r.keys() and r["ratio"] > 0
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(layer_specs(), min_size=1, max_size=4), fault_at=st.integers(0, 12),
       code=st.sampled_from([errno.EIO, errno.ENOSPC, errno.EFAULT]), backend=st.sampled_from(["pread", "io_uring"]),
       direct=st.booleans(), num_buffers=st.integers(1, 3))
def test_random_fault_then_reset_is_clean(files, layers, fault_at, code, backend, direct, num_buffers):
    """A read failing at a random point of random layers streamed over and over: exactly one acquire
    raises StreamerIOError (errno kept, file named), every other layer is byte-identical, and after
    reset() every layer streams byte-identical again."""
    if backend == "io_uring" and not build_info()["io_uring_available"]:
        backend = "pread"
    if all(length == 0 for r in layers for _, _, length in r):
        layers = layers + [[(0, 5, 100)]]  # something to read, so the fault fires
    paths, _ = files
    need = max(1, max(layout_bytes(r) for r in layers))
    with WeightStreamer(paths, buffer_bytes=need, num_buffers=num_buffers, backend=backend, direct=direct,
                        chunk_bytes=4096, queue_depth=3) as s:
        ids = [s.add_layer(r) for r in layers]
        s.inject_fault(fault_at, code)
        failures = 0
        for _ in range(fault_at + 1):  # every pass reads at least once
            for i in ids:
                try:
                    view = s.acquire(i)
                except StreamerIOError as exc:
                    failures += 1
                    assert exc.errno == code and any(p in str(exc) for p in paths), exc
                    continue
                assert_layer(view, layers[i], paths)
                s.release(i)
        assert failures == 1 and s.stats()["errors"] == 1
        s.reset()
        for i, view in stream_all(s, ids, num_buffers):
            assert_layer(view, layers[i], paths)
