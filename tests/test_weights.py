"""llmcad.streaming.weights: safetensors header index, per-layer byte ranges, and load-time file errors."""
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmcad.errors import WeightFileError
from llmcad.streaming.weights import ITEMSIZE, load_index, read_header
from tiny_models import build_tiny


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return build_tiny("qwen2", tmp_path_factory.mktemp("single") / "m", num_layers=3)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("tied") / "m", num_layers=2, tie=True)


@pytest.fixture()
def sharded(tmp_path):
    return build_tiny("llama", tmp_path / "m", num_layers=4, max_shard_size="20KB")


def _bytes_at(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _check_against_safetensors(index):
    """Every indexed tensor's bytes, read at the indexed offset, are the tensor safetensors returns."""
    for entry in index.tensors.values():
        path = index.files[entry.file_index]
        with safe_open(path, framework="pt") as f:
            ref = f.get_tensor(entry.name)
        assert tuple(ref.shape) == entry.shape and ref.dtype == entry.torch_dtype
        raw = _bytes_at(path, entry.offset, entry.length)
        assert raw == ref.contiguous().view(torch.uint8).numpy().tobytes(), entry.name


def test_single_file_groups_layers_and_non_layer_tensors(single):
    index = load_index(single)
    assert index.num_layers == 3 and len(index.files) == 1
    assert index.layer_prefix == "model.layers."
    assert {t.name for t in index.non_layer} == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(3):
        assert all(t.name.startswith(f"model.layers.{i}.") for t in index.layers[i])
        assert index.layer_bytes(i) == sum(ITEMSIZE[t.dtype] * torch.Size(t.shape).numel() for t in index.layers[i])
        ranges = index.layer_ranges(i)
        assert len(ranges.ranges) == 1  # one file: a layer's tensors are contiguous
        assert ranges.nbytes == index.layer_bytes(i)
    assert index.total_bytes() == index.non_layer_bytes() + sum(index.layer_bytes(i) for i in range(3))
    _check_against_safetensors(index)


def test_local_names_match_layer_parameters(single):
    index = load_index(single)
    names = {index.local_name(t, 1) for t in index.layers[1]}
    assert "self_attn.q_proj.weight" in names and "mlp.down_proj.weight" in names


def test_layer_ranges_place_each_tensor_inside_its_range(sharded):
    index = load_index(sharded)
    for i in range(index.num_layers):
        lr = index.layer_ranges(i)
        for entry, r, delta in lr.tensors:
            f, off, length = lr.ranges[r]
            assert f == entry.file_index and off + delta == entry.offset
            assert 0 <= delta and delta + entry.length <= length


def test_tied_checkpoint_has_no_lm_head(tied):
    index = load_index(tied)
    assert "lm_head.weight" not in index.tensors
    assert "model.embed_tokens.weight" in {t.name for t in index.non_layer}
    assert index.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert load_index(build_tiny("llama", tied.parent / "untied", num_layers=2)).tied == {}


def test_sharded_checkpoint(sharded):
    index = load_index(sharded)
    assert len(index.files) > 1 and index.num_layers == 4
    assert len({t.file_index for i in range(4) for t in index.layers[i]}) > 1
    _check_against_safetensors(index)


def test_truncated_file_names_the_file(tmp_path):
    path = build_tiny("qwen2", tmp_path / "m", num_layers=2) / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1)
    with pytest.raises(WeightFileError, match="truncated") as err:
        load_index(path.parent)
    assert str(path) in str(err.value)


def test_file_shorter_than_its_header_length(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(WeightFileError, match=str(path)):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(WeightFileError, match="truncated"):
        read_header(path)


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    new = mutate(header)
    new = new if isinstance(new, bytes) else json.dumps(header).encode()
    new = new.ljust(n, b" ")[:n] if len(new) <= n else new
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("mutation", ["garbage", "bad_dtype", "wrong_length", "past_end"])
def test_corrupt_header_names_the_file(tmp_path, mutation):
    path = build_tiny("qwen2", tmp_path / "m", num_layers=2) / "model.safetensors"

    def mutate(header):
        name = next(k for k in header if k != "__metadata__")
        if mutation == "garbage":
            return b"{not json" + b"\xff" * 8
        if mutation == "bad_dtype":
            header[name]["dtype"] = "Q4"
        elif mutation == "wrong_length":
            header[name]["data_offsets"][1] -= 2
        else:
            header[name]["data_offsets"][1] += 10**9
        return header

    _rewrite_header(path, mutate)
    with pytest.raises(WeightFileError, match="corrupt|truncated") as err:
        load_index(path.parent)
    assert str(path) in str(err.value)


def test_missing_shard_names_the_file(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightFileError, match="missing") as err:
        load_index(sharded)
    assert str(shard) in str(err.value)


def test_shard_index_promising_an_absent_tensor(sharded):
    index_path = sharded / "model.safetensors.index.json"
    data = json.loads(index_path.read_text())
    data["weight_map"]["model.layers.0.extra.weight"] = next(iter(data["weight_map"].values()))
    index_path.write_text(json.dumps(data))
    with pytest.raises(WeightFileError, match="extra.weight"):
        load_index(sharded)


def test_no_weights_or_no_directory(tmp_path):
    with pytest.raises(WeightFileError, match="not found"):
        load_index(tmp_path / "absent")
    with pytest.raises(WeightFileError, match="no safetensors"):
        load_index(tmp_path)


def _in_thread(fn, timeout_s=20.0):
    """fn()'s exception (None when it returned), or fail when it is still blocked after ``timeout_s``."""
    import threading

    outcome = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "blocked: opening a FIFO as a weight file waits for a writer forever"
    return outcome.get("exc")


def test_fifo_as_the_weight_file_is_refused_without_blocking(tmp_path):
    path = build_tiny("qwen2", tmp_path / "m", num_layers=2) / "model.safetensors"
    path.unlink()
    os.mkfifo(path)
    exc = _in_thread(lambda: load_index(path.parent))
    assert isinstance(exc, WeightFileError) and re.search(r"model\.safetensors: is a FIFO, not a safetensors", str(exc))


def test_fifo_shard_is_refused_without_blocking(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    os.mkfifo(shard)
    exc = _in_thread(lambda: load_index(sharded))
    assert isinstance(exc, WeightFileError) and f"{shard}: is a FIFO" in str(exc)


def _point_shard(directory, to):
    """Rewrite the shard index so the tensors of the first shard are listed as being in file ``to``."""
    index_path = directory / "model.safetensors.index.json"
    data = json.loads(index_path.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    data["weight_map"] = {k: (str(to) if v == first else v) for k, v in data["weight_map"].items()}
    index_path.write_text(json.dumps(data))
    return directory / first


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_shard_index_naming_a_file_outside_the_directory_is_refused(sharded, tmp_path, where):
    outside = tmp_path / "outside.safetensors"
    first = _point_shard(sharded, outside if where == "absolute" else "../outside.safetensors")
    shutil.copy(first, outside)  # a valid shard: the old index read it without a word
    with pytest.raises(WeightFileError, match=r"weight_map names .*outside\.safetensors.*not a file inside the model"):
        load_index(sharded)


def test_shard_linking_out_of_the_directory_is_refused(sharded, tmp_path):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(WeightFileError, match=r"links to .*outside\.safetensors, outside the model directory"):
        load_index(sharded)


def test_hub_cache_snapshot_links_into_its_blobs(single, tmp_path):
    """A Hugging Face cache snapshot's files are links to ``../../blobs/<hash>``: still inside the model."""
    snapshot = tmp_path / "models--o--m" / "snapshots" / "abc123"
    blobs = tmp_path / "models--o--m" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in single.iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    assert load_index(snapshot).num_layers == 3


def _write_raw_header(path, header: bytes):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


def test_deeply_nested_metadata_is_one_clear_error(single, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(single / "model.safetensors", path)
    _write_raw_header(path, b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(WeightFileError, match=re.escape(f"{path}: corrupt safetensors header (JSON nested too deeply")):
        read_header(path)


@pytest.mark.parametrize("shape", ["[1e999]", "[1.5, 2]", '["3"]', "[true]", "[1e30]"])
def test_non_integer_or_huge_shape_is_one_clear_error(single, tmp_path, shape):
    path = tmp_path / "model.safetensors"
    shutil.copy(single / "model.safetensors", path)
    text = f'{{"w":{{"dtype":"F32","shape":{shape},"data_offsets":[0,4]}}}}'.encode()
    _write_raw_header(path, text)
    with pytest.raises(WeightFileError, match=re.escape(f"{path}: corrupt safetensors header")):
        read_header(path)


def test_fifo_shard_index_is_refused_without_blocking(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index_path.unlink()
    os.mkfifo(index_path)
    exc = _in_thread(lambda: load_index(sharded))
    assert isinstance(exc, WeightFileError) and f"{index_path}: not a regular file" in str(exc)
