"""llmcad.streaming.budget: size parsing, placement under a budget, and the too-small-budget error."""
import re

import pytest
import torch
from transformers import DynamicCache

from llmcad.streaming.budget import (
    kv_cache_bytes,
    module_bytes,
    parse_size,
    plan_placement,
    spread_layers,
    streamer_memory_bytes,
)
from llmcad.errors import BudgetError
from llmcad.speculative.forward import cache_kwargs
from llmcad.streaming.weights import load_index
from tiny_models import build_tiny, load_resident


@pytest.mark.parametrize("text, expected", [
    ("2GiB", 2 * 2**30), ("1.5GB", 1_500_000_000), ("800MiB", 800 * 2**20), ("123", 123),
    (4096, 4096), ("64 KiB", 65536), ("3kb", 3000), ("1TiB", 2**40), ("10B", 10), (" 7 ", 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["2 GiBs", "abc", "", "GiB", "-1", "1e9", 0, -5, True, 1.5, None, [1]])
def test_parse_size_rejects_and_names_the_budget(bad):
    with pytest.raises(BudgetError, match="memory_budget"):
        parse_size(bad)


def test_budget_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return load_index(build_tiny("qwen2", tmp_path_factory.mktemp("b") / "m", num_layers=4))


def _minimum(index, **kw):
    """The smallest budget plan_placement accepts, found from its own error message."""
    with pytest.raises(BudgetError) as err:
        plan_placement(index, memory_budget=1, **kw)
    return int(re.search(r"\((\d+) bytes\) for", str(err.value)).group(1))


def test_large_budget_keeps_everything_resident(index):
    p = plan_placement(index, memory_budget="1GiB")
    assert p.resident_layers == [0, 1, 2, 3] and p.streamed_layers == []
    assert p.bytes_per_pass == 0 and p.accounting["streamer_buffers"] == 0
    assert p.accounting["total"] == index.total_bytes()


def test_too_small_budget_says_how_much_is_needed(index):
    need = _minimum(index, draft_bytes=1000, kv_bytes=500)
    layer_buf = max(index.layer_bytes(i) for i in range(4))
    assert need == 1000 + 500 + index.non_layer_bytes() + streamer_memory_bytes(layer_buf, 2, 1)
    with pytest.raises(BudgetError, match=f"needs at least .*{need} bytes"):
        plan_placement(index, memory_budget=need - 1, draft_bytes=1000, kv_bytes=500)
    p = plan_placement(index, memory_budget=need, draft_bytes=1000, kv_bytes=500)
    assert p.resident_layers == [] and p.streamed_layers == [0, 1, 2, 3]
    assert p.num_buffers == 2 and p.buffer_bytes == layer_buf
    assert p.bytes_per_pass == sum(index.layer_bytes(i) for i in range(4))
    assert p.accounting["total"] == need and p.accounting["spare"] == 0


def test_spare_budget_pins_layers_spread_among_the_streamed(index):
    need = _minimum(index)
    previous = -1
    for extra in range(0, 4 * index.layer_bytes(0) + 1, index.layer_bytes(0) // 3):
        p = plan_placement(index, memory_budget=need + extra)
        k = len(p.resident_layers)
        assert p.resident_layers == spread_layers(k, 4)
        assert p.streamed_layers == [i for i in range(4) if i not in p.resident_layers]
        assert k >= previous  # more budget never streams more
        assert p.accounting["total"] <= need + extra
        previous = k
    assert previous == 4


def test_max_resident_layers_and_buffer_count(index):
    p = plan_placement(index, memory_budget="1GiB", max_resident_layers=1, num_buffers=4)
    assert p.resident_layers == [2] and p.num_buffers == 4
    assert p.accounting["streamer_buffers"] == streamer_memory_bytes(p.buffer_bytes, 4, 1)


def test_conversion_scratch_counted_when_dtype_differs(index):
    same = plan_placement(index, memory_budget="1GiB", max_resident_layers=0, dtype=torch.float32)
    half = plan_placement(index, memory_budget="1GiB", max_resident_layers=0, dtype=torch.bfloat16)
    assert same.accounting["conversion_scratch"] == 0
    assert half.accounting["conversion_scratch"] == max(index.layer_bytes(i) for i in range(4)) // 2
    resident = [t for t in index.non_layer if t is not index.embedding]
    assert half.accounting["target_non_layer"] == sum(t.length for t in resident) // 2
    assert half.accounting["sparse_row_cache"] == index.embedding.length // 2  # 96 rows: all cached


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Untied and tied models whose embedding table (4096 rows) outweighs a decoder layer."""
    root = tmp_path_factory.mktemp("wide")
    return {tie: load_index(build_tiny("qwen2", root / f"tie{tie}", num_layers=16, tie=tie, vocab_size=4096))
            for tie in (False, True)}


def test_the_embedding_table_is_read_by_rows_and_its_budget_pins_layers(wide):
    index = wide[False]
    embed = index.embedding
    assert embed.length > 4 * index.layer_bytes(0)
    budget = _minimum(index, sparse_embedding=False) + index.layer_bytes(0)
    table = plan_placement(index, memory_budget=budget, sparse_embedding=False)
    rows = plan_placement(index, memory_budget=budget)
    assert table.sparse_tensors == [] and embed.name in table.resident_tensors
    assert rows.sparse_tensors == [embed.name] and embed.name not in rows.resident_tensors
    assert rows.resident_tensors == ["lm_head.weight", "model.norm.weight"]
    cache = min(1024, embed.shape[0]) * embed.length // embed.shape[0]
    assert rows.accounting["sparse_row_cache"] == cache
    # the table less its row cache buys whole layers, each no longer read per pass
    gained = (embed.length - cache + table.accounting["spare"]) // index.layer_bytes(0)
    assert gained >= 3 and len(rows.resident_layers) == len(table.resident_layers) + gained
    assert rows.bytes_per_pass == table.bytes_per_pass - gained * index.layer_bytes(0)
    summary = rows.summary()
    assert summary["sparse_tensors"] == [embed.name] and summary["bytes_per_pass"] == rows.bytes_per_pass


def test_everything_resident_reads_nothing_and_keeps_the_table(wide):
    index = wide[False]
    p = plan_placement(index, memory_budget=index.total_bytes())
    assert p.streamed_layers == [] and p.sparse_tensors == [] and p.bytes_per_pass == 0
    assert p.accounting["total"] == index.total_bytes()
    squeezed = plan_placement(index, memory_budget=index.total_bytes() - 1)
    assert squeezed.sparse_tensors == [index.embedding.name]  # every layer still fits, rows read
    assert squeezed.streamed_layers == [] and squeezed.bytes_per_pass == 0


def test_a_tied_head_is_held_once_and_serves_the_rows(wide):
    index = wide[True]
    assert "lm_head.weight" not in index.tensors and index.tied == {"lm_head.weight": index.embedding.name}
    p = plan_placement(index, memory_budget=_minimum(index))
    assert p.sparse_tensors == [] and p.resident_tensors == [index.embedding.name, "model.norm.weight"]
    assert p.accounting["target_non_layer"] == index.non_layer_bytes()


def test_streamer_memory_matches_the_streamer(index):
    from llmcad.streaming.streamer import WeightStreamer

    p = plan_placement(index, memory_budget="1GiB", max_resident_layers=1, num_buffers=3)
    with WeightStreamer(index.files, buffer_bytes=p.buffer_bytes, num_buffers=3) as s:
        for i in p.streamed_layers:  # every streamed layer fits a buffer
            s.add_layer(index.layer_ranges(i).ranges)
        assert s.memory_bytes == p.accounting["streamer_buffers"]


def test_kv_cache_bytes_matches_a_real_cache(tmp_path):
    model = load_resident(build_tiny("llama", tmp_path / "m", num_layers=3))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.arange(11)[None], **cache_kwargs(model, cache), use_cache=True)
    actual = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert kv_cache_bytes(model.config, 11, torch.float32) == actual
    assert module_bytes(model) == sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))


def test_a_plan_is_what_the_streamer_allocates(tmp_path):
    """Buffer size and ring memory come from the C++ streamer: every streamed layer of a sharded,
    unaligned checkpoint fits the planned buffer, and the ring holds exactly the memory budgeted."""
    from llmcad.streaming.streamer import WeightStreamer

    index = load_index(build_tiny("llama", tmp_path / "m", num_layers=4, max_shard_size="20KB"))
    assert len(index.files) > 2
    for num_buffers in (1, 3):
        kw = {"num_buffers": num_buffers, "max_resident_layers": 0}
        p = plan_placement(index, memory_budget=_minimum(index, **kw), **kw)
        assert p.streamed_layers == [0, 1, 2, 3]
        with WeightStreamer(index.files, buffer_bytes=p.buffer_bytes, num_buffers=num_buffers) as s:
            for i in p.streamed_layers:
                s.add_layer(index.layer_ranges(i).ranges)
            assert s.memory_bytes == p.accounting["streamer_buffers"]


MiB = 2**20


@pytest.mark.parametrize("limit, available, held, expected", [
    (4096 * MiB, 10**12, 0, 4096 * MiB - int(4096 * MiB * 0.05)),  # the cgroup's limit, less 5%
    (1024 * MiB, 10**12, 0, 1024 * MiB - 128 * MiB),  # ... less at least 128 MiB
    (None, 3000 * MiB, 500 * MiB, 3500 * MiB - int(3500 * MiB * 0.05)),  # no cgroup: MemAvailable + held
])
def test_auto_budget_is_the_cgroup_limit_else_what_is_free_less_a_margin(monkeypatch, limit, available, held,
                                                                          expected):
    from llmcad import memory
    from llmcad.streaming.budget import resolve_budget

    monkeypatch.setattr(memory, "cgroup_memory_limit", lambda: limit)
    monkeypatch.setattr(memory, "mem_available_bytes", lambda: available)
    monkeypatch.setattr(memory, "rss_bytes", lambda: held)
    nbytes, source = resolve_budget("auto")
    assert nbytes == expected
    assert source.startswith("auto: ") and ("cgroup" in source) == (limit is not None) and "margin" in source


def test_a_budget_above_the_cgroup_limit_is_refused(monkeypatch):
    from llmcad import memory
    from llmcad.streaming.budget import resolve_budget

    monkeypatch.setattr(memory, "cgroup_memory_limit", lambda: 1024 * MiB)
    assert resolve_budget("1GiB") == (1024 * MiB, "given")
    with pytest.raises(BudgetError, match=r"above this process's memory cgroup limit \(1.00 GiB\)"):
        resolve_budget("1.5GiB")


def test_the_floor_and_the_least_pass_are_in_the_least_plan(index):
    from llmcad.streaming.budget import PASS_ROWS, RUNTIME_SLACK

    def work(rows):
        return 1000 * rows

    need = _minimum(index, runtime_floor=300 * MiB, work=work)
    assert need == _minimum(index) + 300 * MiB + RUNTIME_SLACK + work(PASS_ROWS[-1])
    with pytest.raises(BudgetError, match=r"runtime floor measured at start-up \(300.0 MiB.*the least plan \("):
        plan_placement(index, memory_budget=need - 1, runtime_floor=300 * MiB, work=work)
    assert plan_placement(index, memory_budget=need, runtime_floor=300 * MiB, work=work).pass_rows == PASS_ROWS[-1]
    roomy = plan_placement(index, memory_budget="2GiB", runtime_floor=300 * MiB, work=work)
    assert roomy.pass_rows == PASS_ROWS[0] and roomy.accounting["pass_work"] == work(PASS_ROWS[0])
    assert roomy.accounting["runtime_floor"] == 300 * MiB and roomy.accounting["runtime_slack"] == RUNTIME_SLACK


@pytest.mark.parametrize("num_layers", [1, 2, 3, 7, 28, 37, 80])
def test_spread_layers_never_pins_two_in_a_row_while_half_or_fewer_stay(num_layers):
    """k distinct layers in range; up to half resident, each resident layer has a streamed one before it
    (its compute hides behind that layer's successor's read) and the last layer read ends the pass
    within one resident layer."""
    for k in range(num_layers + 1):
        resident = spread_layers(k, num_layers)
        assert resident == sorted(set(resident)) and len(resident) == k
        assert all(0 <= i < num_layers for i in resident)
        streamed = [i for i in range(num_layers) if i not in resident]
        if 0 < k <= num_layers // 2:
            assert resident[0] > 0 and all(b - a >= 2 for a, b in zip(resident, resident[1:]))
        if streamed:
            assert sum(1 for i in resident if i > streamed[-1]) <= max(1, -(-k // len(streamed)))
    with pytest.raises(ValueError, match="k=5"):
        spread_layers(5, 4)
