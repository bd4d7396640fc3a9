"""llmcad.streaming.streamed: the layer-streamed target is a bit-identical drop-in for the in-memory model."""
import threading
import time

import pytest
import torch
from transformers import DynamicCache

from llmcad.speculative import tree
from llmcad.speculative.forward import cache_kwargs
from llmcad.streaming.budget import kv_cache_bytes, module_bytes, plan_placement, resident_placement, spread_layers
from llmcad.errors import BudgetError, EngineClosedError, ModelLoadError
from llmcad.streaming.streamed import decoder_layers, load_streamed_target
from llmcad.streaming.weights import load_index
from clocks import loads_within
from tiny_models import FAMILIES, build_tiny, load_resident

NUM_LAYERS = 4
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 3, 6]  # a 9-node tree with branches at several depths
PROMPT_LEN = 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    return {family: build_tiny(family, root / family, num_layers=NUM_LAYERS, tie=family == "llama", seed=i)
            for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def references(checkpoints):
    return {family: load_resident(path) for family, path in checkpoints.items()}


def _placement(path, k, num_buffers=2, dtype=None):
    return plan_placement(load_index(path), memory_budget="1GiB", max_resident_layers=k,
                          num_buffers=num_buffers, dtype=dtype)


def _prompt_then_tree(model, seed=0):
    """A prompt pass with a fresh cache, then a tree pass over PARENTS with a float 4D tree mask."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), generator=gen)
    nodes = torch.randint(0, model.config.vocab_size, (1, len(PARENTS)), generator=gen)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True).logits
        mask = tree.attention_mask(PARENTS, PROMPT_LEN, dtype=model.dtype)
        positions = torch.as_tensor(tree.position_ids(PARENTS, PROMPT_LEN))[None]
        second = model(input_ids=nodes, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache),
                       use_cache=True).logits
    return first, second, cache


def _assert_same(ref, streamed, seed=0):
    a1, a2, cache_a = _prompt_then_tree(ref, seed)
    b1, b2, cache_b = _prompt_then_tree(streamed, seed)
    assert torch.equal(a1, b1), "prompt pass logits differ"
    assert torch.equal(a2, b2), "tree pass logits differ"
    for la, lb in zip(cache_a.layers, cache_b.layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [0, 1, NUM_LAYERS - 1])
@pytest.mark.parametrize("num_buffers", [2, 4])
def test_logits_bit_identical(checkpoints, references, family, k, num_buffers):
    streamed = load_streamed_target(checkpoints[family], placement=_placement(checkpoints[family], k, num_buffers))
    model = streamed.model
    try:
        ctl = streamed
        assert ctl.placement.resident_layers == spread_layers(k, NUM_LAYERS)  # interleaved with the streamed
        _assert_same(references[family], model)
        # streamed layers hold no weights between passes
        assert all(p.device.type == "meta" for i in ctl.placement.streamed_layers
                   for p in decoder_layers(model)[i].parameters())
    finally:
        streamed.close()


def test_converted_dtype_is_bit_identical(tmp_path):
    """bf16 on disk computed in fp32: each streamed layer is converted once per pass, like from_pretrained."""
    path = build_tiny("qwen2", tmp_path / "m", num_layers=3, dtype=torch.bfloat16)
    ref = load_resident(path, dtype=torch.float32)
    streamed = load_streamed_target(path, placement=_placement(path, 1, dtype=torch.float32), dtype=torch.float32)
    model = streamed.model
    try:
        assert model.dtype == torch.float32
        _assert_same(ref, model)
        assert streamed.placement.accounting["conversion_scratch"] > 0
    finally:
        streamed.close()


def test_sharded_checkpoint_streams_across_files(tmp_path):
    path = build_tiny("llama", tmp_path / "m", num_layers=4, max_shard_size="20KB")
    assert len(load_index(path).files) > 2
    streamed = load_streamed_target(path, placement=_placement(path, 0))
    model = streamed.model
    try:
        _assert_same(load_resident(path), model)
    finally:
        streamed.close()


def test_bytes_read_per_pass_are_streamed_layers_plus_the_rows_of_new_tokens(checkpoints):
    """Per pass: every streamed layer, and one embedding row per token id not read before (the rows
    are cached); never the whole embedding table."""
    path = checkpoints["qwen2"]
    index = load_index(path)
    streamed = load_streamed_target(path, placement=_placement(path, 1))
    model = streamed.model
    ctl = streamed
    row = index.embedding.length // index.embedding.shape[0]
    try:
        per_pass = sum(index.layer_bytes(i) for i in range(1, NUM_LAYERS))
        assert ctl.placement.bytes_per_pass == per_pass
        assert ctl.placement.sparse_tensors == [index.embedding.name]
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (PROMPT_LEN,), generator=gen)
        nodes = torch.randint(0, model.config.vocab_size, (len(PARENTS),), generator=gen)
        _prompt_then_tree(model)
        seen = set(prompt.tolist()) | set(nodes.tolist())
        assert ctl.passes == 2 and ctl.sparse_bytes_read == len(seen) * row
        assert ctl.bytes_read == 2 * per_pass + len(seen) * row
        assert ctl.last_pass_bytes == per_pass + len(set(nodes.tolist()) - set(prompt.tolist())) * row
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
        assert ctl.bytes_read == 3 * per_pass + len(seen | {5, 6, 7}) * row
        assert ctl.last_pass_bytes == per_pass + len({5, 6, 7} - seen) * row
    finally:
        ctl.close()


def test_tracked_memory_stays_within_the_budget(checkpoints, references):
    path = checkpoints["mistral"]
    draft = references["qwen2"]  # any resident model stands in for the draft
    tokens = PROMPT_LEN + len(PARENTS)
    kv = kv_cache_bytes(draft.config, tokens, torch.float32) + kv_cache_bytes(references["mistral"].config, tokens,
                                                                              torch.float32)
    index = load_index(path)
    minimum = plan_placement(index, memory_budget="1GiB", max_resident_layers=0, draft_bytes=module_bytes(draft),
                             kv_bytes=kv).accounting["total"]
    budget = minimum + index.layer_bytes(0) + 100  # room for exactly one resident layer
    placement = plan_placement(index, memory_budget=budget, draft_bytes=module_bytes(draft), kv_bytes=kv)
    assert len(placement.resident_layers) == 1
    streamed = load_streamed_target(path, placement=placement)
    model = streamed.model
    ctl = streamed
    try:
        _, _, cache = _prompt_then_tree(model)
        cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        assert cache_bytes <= kv
        assert ctl.streamer.memory_bytes == placement.accounting["streamer_buffers"]
        assert ctl.resident_bytes == (placement.accounting["target_non_layer"]
                                      + placement.accounting["target_resident_layers"] + _buffer_bytes(model))
        held = module_bytes(draft) + ctl.peak_tracked_bytes + cache_bytes
        assert held <= budget + _buffer_bytes(model)
    finally:
        ctl.close()


def _buffer_bytes(model):
    """Non-persistent buffers (rotary inv_freq): bytes, not in the checkpoint, so not in the plan."""
    return sum(b.nbytes for b in model.buffers())


def test_too_small_budget_is_refused(checkpoints):
    with pytest.raises(BudgetError, match="needs at least"):
        plan_placement(load_index(checkpoints["llama"]), memory_budget=10_000)


def test_generate_matches_in_memory(checkpoints, references):
    streamed = load_streamed_target(checkpoints["gemma"], placement=_placement(checkpoints["gemma"], 1))
    model = streamed.model
    try:
        ids = torch.tensor([[1, 5, 9, 13]])
        want = references["gemma"].generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
        assert model.get_input_embeddings().weight.device.type == "cpu"
    finally:
        streamed.close()


def test_generation_config_is_the_checkpoints(tmp_path):
    """EOS ids and defaults come from generation_config.json, as with from_pretrained, not from config.json."""
    from transformers import GenerationConfig

    path = build_tiny("qwen2", tmp_path / "m", num_layers=2)
    GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0, max_new_tokens=5).save_pretrained(path)
    ref = load_resident(path)
    streamed = load_streamed_target(path, placement=_placement(path, 0))
    try:
        got = streamed.model.generation_config
        assert got.eos_token_id == [2, 7] != streamed.model.config.eos_token_id
        assert got.to_dict() == ref.generation_config.to_dict()
    finally:
        streamed.close()


def test_pass_that_raises_midway_leaves_the_next_pass_correct(checkpoints, references):
    streamed = load_streamed_target(checkpoints["qwen2"], placement=_placement(checkpoints["qwen2"], 0))
    model = streamed.model
    layer = decoder_layers(model)[2]
    fail = {"once": True}

    def boom(module, args):
        if fail.pop("once", False):
            raise RuntimeError("injected")

    handle = layer.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected"), torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5]]))
        _assert_same(references["qwen2"], model)
    finally:
        handle.remove()
        streamed.close()


def test_io_error_surfaces_and_the_target_recovers(checkpoints, references):
    from llmcad.errors import StreamerIOError

    streamed = load_streamed_target(checkpoints["llama"], placement=_placement(checkpoints["llama"], 0))
    model = streamed.model
    ctl = streamed
    try:
        ctl.drop_prefetch()  # drop the prefetched first pass so the fault hits a read of the next one
        ctl.streamer.inject_fault(0)
        with pytest.raises(StreamerIOError), torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5]]))
        _assert_same(references["llama"], model)
    finally:
        ctl.close()


def test_next_layer_ready_and_prefetch_switch(checkpoints):
    streamed = load_streamed_target(checkpoints["llama"], placement=_placement(checkpoints["llama"], 0))
    model = streamed.model
    ctl = streamed
    try:
        ctl.drop_prefetch()
        assert not ctl.next_layer_ready()  # nothing queued
        ctl.prefetch_between_passes = False
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4]]))
        assert not ctl.next_layer_ready()  # the pass ended and queued nothing
        ctl.prefetch_between_passes = True
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4]]))
        deadline = time.monotonic() + 30
        while not ctl.next_layer_ready() and time.monotonic() < deadline:  # the ring fills while idle
            time.sleep(0.01)
        assert ctl.next_layer_ready()
    finally:
        ctl.close()


def test_acquire_watchers_run_in_hook_order_and_loads_name_decoder_layers(checkpoints):
    streamed = load_streamed_target(checkpoints["llama"], placement=_placement(checkpoints["llama"], 1))
    model, events = streamed.model, []

    def log(tag):
        def record(i, *_hook_args):
            i = i if isinstance(i, int) else list(streamed.layers).index(i)
            bound = all(p.device.type != "meta" for p in streamed.layers[i].parameters())
            events.append((tag, i, bound))
        return record

    handles = [streamed.watch_acquire(log("before"), log("after"))]
    handles += [layer.register_forward_pre_hook(log("compute")) for layer in streamed.layers]
    try:
        streamed.drop_prefetch()
        mark, t0 = streamed.load_mark(), time.perf_counter()
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4]]))
        t1 = time.perf_counter()
        ids = streamed.placement.streamed_layers  # every layer but the resident one, in order
        assert len(ids) == NUM_LAYERS - 1
        want = []
        for i in range(NUM_LAYERS):
            want += [("before", i, False), ("after", i, True)] if i in ids else []
            want += [("compute", i, True)]
        assert events == want
        loads = streamed.loads_since(mark)[:len(ids)]  # the next pass's prefetch may follow
        assert [r.layer_id for r in loads] == ids and all(r.ok for r in loads)
        assert loads_within(loads, t0, t1)
        assert [r.bytes for r in loads] == [streamed.index.layer_bytes(i) for i in ids]
        handles[0].remove()
        events.clear()
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4]]))
        assert [e[0] for e in events] == ["compute"] * NUM_LAYERS
    finally:
        for h in handles:
            h.remove()
        streamed.close()


def test_close_with_prefetched_pass_does_not_hang_and_forward_after_close_fails(checkpoints):
    streamed = load_streamed_target(checkpoints["llama"], placement=_placement(checkpoints["llama"], 0))
    model = streamed.model
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]))  # leaves the next pass prefetched
    closer = threading.Thread(target=streamed.close)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "close() hung"
    streamed.close()  # idempotent
    with pytest.raises(EngineClosedError), torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]))


def test_all_resident_placement_needs_no_streamer(checkpoints, references):
    path = checkpoints["phi3"]
    streamed = load_streamed_target(path, placement=resident_placement(load_index(path)))
    model = streamed.model
    assert streamed.streamer is None
    _assert_same(references["phi3"], model)


def test_config_disagreeing_with_weights_is_a_load_error(tmp_path):
    path = build_tiny("llama", tmp_path / "m", num_layers=2)
    config = (path / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (path / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match="decoder layers"):
        load_streamed_target(path)


def test_bench_pass_runs_on_a_tiny_model(checkpoints):
    """Smoke test of `llmcad bench pass` (its timings are not asserted: benchmarks are not timed tests)."""
    from llmcad.bench.pass_measure import measure

    result = measure(checkpoints["qwen2"], tree_nodes=5, prefix_len=3, repeats=1)
    assert result["streamed_layers"] == NUM_LAYERS and result["resident_layers"] == 0
    assert set(result) >= {"wall_s", "io_s", "compute_s", "overlap_ratio"}
    assert result["overlap_ratio"] == result["wall_s"] / max(result["io_s"], result["compute_s"])



def test_bench_pass_beside_a_draft_places_the_target_as_the_engine_does(tiny_pair_dirs):
    """`llmcad bench pass --draft D --memory-budget B` measures the placement the engine runs at B,
    not the target alone holding all of B."""
    from llmcad.bench.pass_measure import measure
    from llmcad.engine import LLMCad
    from pair_models import least_budget

    dirs = tiny_pair_dirs("qwen2")
    budget = least_budget(dirs["shared"], dirs["target"])  # every layer streams beside the draft
    with LLMCad.from_pretrained(dirs["shared"], dirs["target"], memory_budget=budget) as engine:
        engine_resident = len(engine.placement.resident_layers)
    beside = measure(dirs["target"], memory_budget=budget, draft=dirs["shared"], tree_nodes=5, prefix_len=3, repeats=1)
    alone = measure(dirs["target"], memory_budget=budget, tree_nodes=5, prefix_len=3, repeats=1)
    assert beside["resident_layers"] == engine_resident < alone["resident_layers"]

KV_TOKENS = 64  # prompt + 16 new tokens + a tree: the cache positions these tests budget for


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["target-only", "chain", "tree", "llmcad"])
def test_every_mode_lossless_under_a_budget_below_draft_plus_target(tiny_pair_dirs, tiny_models, monkeypatch,
                                                                    mode, family):
    """At the least budget the engine accepts, every target layer streams and the models' memory (weights
    and ring) is below draft + target; the runtime floor and the pass come on top of it."""
    from llmcad.engine import LLMCad
    from llmcad.streaming import streamed as streamed_module

    monkeypatch.setattr(streamed_module, "DEFAULT_KV_TOKENS", KV_TOKENS)
    dirs = tiny_pair_dirs(family)
    draft, target = tiny_models(family, "shared"), tiny_models(family, "target")
    with pytest.raises(BudgetError) as err:  # find the smallest budget that streams every layer
        LLMCad.from_pretrained(dirs["shared"], dirs["target"], mode=mode, memory_budget=1)
    budget = int(err.value.args[0].split("(")[2].split(" bytes")[0])
    engine = LLMCad.from_pretrained(dirs["shared"], dirs["target"], mode=mode, memory_budget=budget)
    try:
        assert engine.placement.resident_layers == [] and engine.placement.streamed_layers
        acct = engine.placement.accounting
        models = acct["draft_weights"] + acct["target_non_layer"] + acct["streamer_buffers"]
        assert models < module_bytes(draft) + module_bytes(target)
        prompt = engine.tokenizer("def add(a, b):")["input_ids"]
        ids = torch.tensor([prompt])
        want = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                               do_sample=False)[0, len(prompt):].tolist()
        got = engine.generate(prompt, max_new_tokens=16).tokens
        assert got == want[:len(got)] and (len(got) == 16 or got[-1] in engine.eos_token_ids)
        ctl = engine.streamed
        # every streamed layer per pass, and embedding rows each read once at most (cached)
        assert ctl.bytes_read == ctl.passes * ctl.placement.bytes_per_pass + ctl.sparse_bytes_read
        embed = ctl.index.embedding
        assert 0 < ctl.sparse_bytes_read <= embed.length and ctl.sparse_bytes_read % (embed.length // embed.shape[0]) == 0
    finally:
        engine.streamed.close()


def test_weight_file_changed_in_place_closes_the_target(tmp_path):
    from llmcad.errors import WeightFileError

    path = build_tiny("qwen2", tmp_path / "m", num_layers=2)
    streamed = load_streamed_target(path, placement=_placement(path, 0))
    model = streamed.model
    weights = path / "model.safetensors"
    time.sleep(0.02)
    with open(weights, "r+b") as f:  # same inode, other bytes
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(WeightFileError, match="model.safetensors: changed on disk"), torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]))
    with pytest.raises(EngineClosedError, match="closed after .*changed on disk"), torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]))
    assert all(p.device.type == "meta" for p in decoder_layers(model).parameters())


def test_the_embedding_table_stays_on_storage(checkpoints, references):
    """Untied: the embedding holds a one-row stand-in that still describes the table; rows are read per
    pass. Tied: the head is the embedding, resident once."""
    untied = load_streamed_target(checkpoints["qwen2"], placement=_placement(checkpoints["qwen2"], 1))
    tied = load_streamed_target(checkpoints["llama"], placement=_placement(checkpoints["llama"], 1))
    try:
        ref = references["qwen2"].get_input_embeddings().weight
        weight = untied.model.get_input_embeddings().weight
        assert weight.shape == ref.shape and weight.dtype == ref.dtype and weight.device.type == "cpu"
        assert weight.untyped_storage().nbytes() == ref.shape[1] * ref.element_size()
        assert tied.placement.sparse_tensors == []
        model = tied.model
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert model.lm_head.weight.device.type == "cpu"
        with pytest.raises(IndexError, match="out of range"):
            with torch.no_grad():
                untied.model(input_ids=torch.tensor([[1, untied.model.config.vocab_size]]))
    finally:
        untied.close()
        tied.close()


def test_a_head_stored_with_the_embeddings_bytes_is_held_once(tmp_path):
    """A tied config whose file also stores lm_head with the embedding's values (transformers ties
    them): loaded once, logits identical; a head with other values stays its own tensor."""
    from safetensors.torch import load_file, save_file

    path = build_tiny("qwen2", tmp_path / "m", num_layers=2, tie=True)
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    index = load_index(path)
    assert index.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    placement = plan_placement(index, memory_budget="1GiB", max_resident_layers=1)
    assert "lm_head.weight" not in placement.resident_tensors and placement.sparse_tensors == []
    streamed = load_streamed_target(path, placement=placement)
    try:
        assert streamed.model.lm_head.weight is streamed.model.get_input_embeddings().weight
        _assert_same(load_resident(path), streamed.model)
    finally:
        streamed.close()
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    assert load_index(path).tied == {}
