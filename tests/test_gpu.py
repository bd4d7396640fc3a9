"""device="cuda" end to end: lossless greedy output on the GPU against transformers on the
GPU in fp32, resident and layer-streamed (copy and zero-copy paths), plans and acceptance from the CUDA
kernels, KV commit on the device. Skipped without a CUDA build and a GPU (scripts/device_check.sh)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import llmcad
from llmcad import LLMCad
from llmcad.speculative import kv
from llmcad.speculative import tree
from llmcad.streaming.budget import plan_placement
from llmcad.speculative.policy import make_policy
from llmcad.speculative.forward import cache_kwargs, pending_tree_inputs
from llmcad.models.loading import load_causal_lm
from llmcad.streaming.streamed import load_streamed_target
from llmcad.speculative.verify import TargetChooser, TargetVerifier
from llmcad.streaming.weights import load_index
from transfer_spy import TransferSpy

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and llmcad.build_info()["cuda_compiled"]
                            and llmcad.build_info()["cuda_available"]), reason="needs a CUDA build and a GPU"),
]

FAMILY = "qwen2"
PROMPTS = ["def add(a, b):", "The quick brown"]
NEW_TOKENS = 16
MODES = [("target-only", {}), ("chain", {}), ("tree", {}), ("llmcad", {}),
         ("llmcad", {"branch_threshold": 0.05, "max_tree_tokens": 12})]
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 3, 6]


@pytest.fixture(scope="module")
def gpu_models(tiny_pair_dirs):
    dirs = tiny_pair_dirs(FAMILY)
    return dirs, {kind: load_causal_lm(dirs[kind], device="cuda") for kind in ("target", "unrelated", "same")}


def reference(model, ids, max_new_tokens=NEW_TOKENS):
    out = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


class KernelSpy:
    """Counts calls of the extension's CUDA tree kernels."""

    NAMES = ("cuda_tree_mask", "cuda_tree_positions", "cuda_tree_accept", "cuda_commit_gather_indices")

    def __init__(self, monkeypatch):
        ext = llmcad._build._ext()
        self.calls = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            monkeypatch.setattr(ext, name, self._counting(name, getattr(ext, name)))

    def _counting(self, name, fn):
        def call(*args):
            self.calls[name] += 1
            return fn(*args)
        return call


@pytest.mark.parametrize("draft_kind", ["target", "unrelated"])
def test_greedy_on_gpu_equals_transformers_on_gpu(gpu_models, tiny_tokenizer, draft_kind, monkeypatch):
    dirs, models = gpu_models
    target = models["target"]
    kernels = KernelSpy(monkeypatch)
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt)["input_ids"]
        expected = reference(target, ids)
        for mode, options in MODES:
            engine = LLMCad(models[draft_kind], target, tiny_tokenizer, make_policy(mode, **options))
            with TransferSpy("cuda") as spy:  # resident target: no verification worker, all on this thread
                result = engine.generate(prompt, NEW_TOKENS)
            assert result.tokens == expected, (draft_kind, mode, options, prompt)
            big = {key: n for key, n in spy.largest.items() if n >= target.config.vocab_size}
            assert big == {}, f"full logits rows were brought to the host: {big}"
            assert spy.count > 0, "the spy saw no transfer at all (the emitted ids must reach the host)"
    assert kernels.calls["cuda_tree_mask"] > 0 and kernels.calls["cuda_tree_positions"] > 0
    assert kernels.calls["cuda_tree_accept"] > 0, "the acceptance walk did not run on the GPU"
    assert kernels.calls["cuda_commit_gather_indices"] > 0, "the KV commit indices were not made on the GPU"


@pytest.mark.parametrize("gpu_path", ["copy", "zero-copy"])
@pytest.mark.parametrize("draft_kind", ["target", "unrelated"])
def test_streamed_target_on_gpu_is_lossless(gpu_models, tiny_tokenizer, gpu_path, draft_kind):
    dirs, models = gpu_models
    placement = plan_placement(load_index(dirs["target"]), memory_budget="1GiB", max_resident_layers=1,
                               num_buffers=2)
    streamed = load_streamed_target(dirs["target"], placement=placement, device="cuda",
                                    streamer_options={"gpu_path": gpu_path})
    ctl = streamed
    try:
        assert ctl.gpu_path == gpu_path
        for prompt in PROMPTS:
            ids = tiny_tokenizer(prompt)["input_ids"]
            expected = reference(models["target"], ids)
            for mode, options in MODES:
                engine = LLMCad(models[draft_kind], streamed.model, tiny_tokenizer, make_policy(mode, **options),
                                streamed=streamed)
                assert engine.generate(prompt, NEW_TOKENS).tokens == expected, (gpu_path, mode, prompt)
        stats = ctl.stats()["gpu"]
        assert stats["host_held"] == 0
        if gpu_path == "copy":
            assert stats["uploads"] == ctl.passes * len(placement.streamed_layers) and stats["device_bytes"] > 0
        else:
            assert stats["device_bytes"] == 0
    finally:
        ctl.close()


@pytest.mark.parametrize("gpu_path", ["copy", "zero-copy"])
def test_streamed_logits_match_resident_on_gpu(gpu_models, gpu_path):
    dirs, models = gpu_models
    placement = plan_placement(load_index(dirs["target"]), memory_budget="1GiB", max_resident_layers=0,
                               num_buffers=2)
    streamed = load_streamed_target(dirs["target"], placement=placement, device="cuda",
                                    streamer_options={"gpu_path": gpu_path})
    try:
        for _ in range(2):  # the second pass reuses the device slots / host buffers
            for a, b in zip(_prompt_then_tree(models["target"]), _prompt_then_tree(streamed.model)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    finally:
        streamed.close()


def _prompt_then_tree(model):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=gen).cuda()
    nodes = torch.randint(0, model.config.vocab_size, (1, len(PARENTS)), generator=gen).cuda()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True).logits
        mask, positions = pending_tree_inputs(6, 0, PARENTS, model.dtype, "cuda")
        second = model(input_ids=nodes, attention_mask=mask, position_ids=positions.view(1, -1),
                       **cache_kwargs(model, cache), use_cache=True).logits
    return first, second


def test_pending_tree_inputs_on_gpu_equal_cpu():
    for cache_len, pending in [(0, 0), (0, 5), (7, 3), (12, 0)]:
        mask_cpu, pos_cpu = pending_tree_inputs(cache_len, pending, PARENTS, torch.float32, "cpu")
        mask_gpu, pos_gpu = pending_tree_inputs(cache_len, pending, PARENTS, torch.float32, "cuda")
        assert mask_gpu.is_cuda and pos_gpu.is_cuda
        assert torch.equal(mask_gpu.cpu(), mask_cpu) and torch.equal(pos_gpu.cpu(), pos_cpu)


def test_verifier_accept_and_commit_on_gpu_equal_cpu(gpu_models):
    _, models = gpu_models
    rng = np.random.default_rng(0)
    tokens = [5] + [int(t) for t in rng.integers(0, 3, len(PARENTS) - 1)]
    for seed in range(20):
        logits = torch.randn(len(PARENTS), 3, generator=torch.Generator().manual_seed(seed))
        chooser = TargetChooser()
        choice_gpu = chooser.choose(logits.cuda())
        assert choice_gpu.is_cuda
        verifiers = {}
        for device, choice in (("cpu", chooser.choose(logits)), ("cuda", choice_gpu)):
            v = TargetVerifier(models["target"], [1, 2, 3, 4])
            v._prefix = 4
            v.cache = _filled_cache(4 + len(PARENTS), device)
            accepted, bonus = v.accept(PARENTS, tokens, choice)
            v.commit(accepted)
            verifiers[device] = (list(accepted), bonus, v.cache)
        assert verifiers["cpu"][:2] == verifiers["cuda"][:2]
        for a, b in zip(verifiers["cpu"][2].layers, verifiers["cuda"][2].layers):
            assert torch.equal(a.keys, b.keys.cpu()) and torch.equal(a.values, b.values.cpu())


def _filled_cache(length, device):
    cache = DynamicCache()
    for layer in range(2):
        keys = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).repeat(1, 2, 1, 4) + layer
        cache.update(keys.to(device), (-keys).to(device), layer)
    return cache


def test_kv_commit_with_device_indices():
    cache = _filled_cache(10, "cuda")
    kv.commit(cache, [0, 1, 2, 5, 7], device_keep=torch.tensor([0, 1, 2, 5, 7], device="cuda"))
    assert kv.cache_length(cache) == 5
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 5, 7]
    kv.commit(cache, [0, 1, 3])  # host indices only: uploaded without a sync
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [1, 2, 6]
    kv.commit(cache, [0, 1])  # a prefix: crop
    assert kv.cache_length(cache) == 2
    with pytest.raises(ValueError, match="host indices"):
        kv.commit(cache, torch.arange(1, device="cuda"))


def test_zero_copy_bytes_are_the_pinned_buffer(tmp_path):
    from llmcad.streaming.gpu_upload import zero_copy_bytes
    from llmcad.streaming.streamer import WeightStreamer

    data = np.random.default_rng(1).integers(0, 256, 3 * 4096, dtype=np.uint8)
    path = tmp_path / "w.bin"
    path.write_bytes(data.tobytes())
    with WeightStreamer(path, buffer_bytes=len(data), num_buffers=2, pinned=True, direct=False) as streamer:
        layer = streamer.add_layer([(0, 0, len(data))])
        view = streamer.acquire(layer)
        assert view.device_ptr
        on_gpu = zero_copy_bytes(view, "cuda")
        assert on_gpu.is_cuda and on_gpu.data_ptr() == view.device_ptr
        assert np.array_equal(on_gpu[view.offsets[0]: view.offsets[0] + len(data)].cpu().numpy(), data)
        streamer.release(layer)


def test_device_integrated_query_agrees_with_torch():
    from llmcad.streaming.gpu_upload import device_integrated, resolve_gpu_path

    flag = device_integrated("cuda")
    assert flag == bool(llmcad._build._ext().cuda_device_integrated(torch.cuda.current_device()))
    assert resolve_gpu_path("auto", "cuda") == ("zero-copy" if flag else "copy")
    with pytest.raises(ValueError, match="no CUDA device"):
        llmcad._build._ext().cuda_device_integrated(10_000)


def test_plan_kernels_run_on_the_current_stream():
    """Work queued on a side stream: the plan is made there and is right once that stream is synced."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        mask = tree.attention_mask(PARENTS, 4, device="cuda")
        side.synchronize()
    assert torch.equal(mask.cpu(), tree.attention_mask(PARENTS, 4))


def _report(check: str, **figures) -> None:
    """One JSON line per figure for scripts/device_check.sh's table ($LLMCAD_DEVICE_REPORT)."""
    import json
    import os

    path = os.environ.get("LLMCAD_DEVICE_REPORT")
    if path:
        with open(path, "a") as sink:
            sink.write(json.dumps({"check": check, **figures}) + "\n")


def _streamed(dirs, gpu_path, resident_layers=0, **options):
    placement = plan_placement(load_index(dirs["target"]), memory_budget="1GiB", max_resident_layers=resident_layers,
                               num_buffers=2)
    return load_streamed_target(dirs["target"], placement=placement, device="cuda",
                                streamer_options={"gpu_path": gpu_path, **options})


SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 8}


@pytest.mark.parametrize("gpu_path", ["copy", "zero-copy"])
def test_sampled_streamed_equals_resident_on_gpu(gpu_models, tiny_tokenizer, gpu_path):
    """Seeded sampling on the GPU: the streamed target (same trees: no pipeline) draws the same tokens
    as the resident one, seed for seed; its logits are the resident model's, so its choices are too."""
    dirs, models = gpu_models
    streamed = _streamed(dirs, gpu_path, resident_layers=1)
    try:
        for seed in range(4):
            for mode in ("chain", "tree", "llmcad"):
                resident = LLMCad(models["unrelated"], models["target"], tiny_tokenizer, make_policy(mode))
                engine = LLMCad(models["unrelated"], streamed.model, tiny_tokenizer, make_policy(mode),
                                streamed=streamed, pipeline=False)
                want = resident.generate(PROMPTS[0], NEW_TOKENS, seed=seed, **SAMPLING).tokens
                assert engine.generate(PROMPTS[0], NEW_TOKENS, seed=seed, **SAMPLING).tokens == want, (mode, seed)
    finally:
        streamed.close()


def test_sampled_top_k_one_is_greedy_on_gpu(gpu_models, tiny_tokenizer):
    dirs, models = gpu_models
    expected = reference(models["target"], tiny_tokenizer(PROMPTS[1])["input_ids"])
    engine = LLMCad(models["unrelated"], models["target"], tiny_tokenizer, make_policy("llmcad"))
    assert engine.generate(PROMPTS[1], NEW_TOKENS, do_sample=True, top_k=1, seed=5).tokens == expected


def test_sampled_first_two_tokens_follow_target_distribution_on_gpu(gpu_models, tiny_tokenizer):
    """Joint frequency of the first two sampled tokens (CUDA generator, acceptance walk on the GPU)
    against the target's own P(t1) P(t2 | t1): chi-square at p = 0.001 over the top-4 support."""
    dirs, models = gpu_models
    target = models["target"]
    chooser = TargetChooser(do_sample=True, temperature=0.8, top_k=4)
    ids = tiny_tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        p1 = chooser.processed_probs(target(torch.tensor([ids], device="cuda")).logits[0, -1:])[0].double().cpu()
        joint = torch.zeros(p1.numel(), p1.numel(), dtype=torch.float64)
        for t1 in torch.nonzero(p1).flatten().tolist():
            row = target(torch.tensor([ids + [t1]], device="cuda")).logits[0, -1:]
            joint[t1] = p1[t1] * chooser.processed_probs(row)[0].double().cpu()
    engine = LLMCad(models["same"], target, tiny_tokenizer, make_policy("llmcad", branch_threshold=0.1))
    runs = 600
    counts = torch.zeros_like(joint)
    for seed in range(runs):
        tokens = engine.generate(ids, 2, do_sample=True, temperature=0.8, top_k=4, seed=seed).tokens
        counts[tokens[0], tokens[1]] += 1
    support = joint > 0
    assert counts[~support].sum() == 0, "a token outside the target's top-k support was emitted"
    expected, observed = joint[support] * runs, counts[support]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    _report("lossless-sampled", chi2=chi2, runs=runs)
    assert chi2 < 37.70, (chi2, observed.tolist(), expected.tolist())  # 15 degrees of freedom, p = 0.001


SLOW_IO = {"bandwidth_cap": 2e6}  # bytes/s: each tiny layer's read takes ~25 ms, far longer than a draft step


def test_provisional_drafting_happens_on_the_gpu_copy_path(gpu_models, tiny_tokenizer):
    """Pipelined, copy path, slow reads, no lockstep: the draft drafts provisionally while the target
    waits for host reads, and the output is still the target's greedy output. Short chains of an
    unrelated draft: many passes, each with tokens left to draft beyond its chain."""
    dirs, models = gpu_models
    streamed = _streamed(dirs, "copy", **SLOW_IO)
    try:
        engine = LLMCad(models["unrelated"], streamed.model, tiny_tokenizer, make_policy("chain", chain_length=2),
                        streamed=streamed, pipeline=True)
        result = engine.generate(PROMPTS[0], NEW_TOKENS)
        assert result.tokens == reference(models["target"], tiny_tokenizer(PROMPTS[0])["input_ids"])
        stats = result.stats
        _report("provisional", drafted=stats["provisional_drafted"], reused=stats["provisional_reused"],
                passes=stats["target_passes"])
        assert stats["provisional_drafted"] > 0, stats
    finally:
        streamed.close()


@pytest.mark.parametrize("gpu_path", ["copy", "zero-copy"])
def test_fp16_streamed_logits_equal_resident_bitwise(gpu_models, tmp_path, gpu_path):
    """An fp16 checkpoint: streamed layers computed on views of the uploaded (or pinned) bytes give
    exactly the resident model's logits, over passes that reuse every slot and buffer."""
    from transformers import AutoModelForCausalLM

    dirs, _ = gpu_models
    half = AutoModelForCausalLM.from_pretrained(dirs["target"], dtype=torch.float16)
    half.save_pretrained(tmp_path / "half")
    resident = load_causal_lm(tmp_path / "half", device="cuda")
    assert resident.dtype == torch.float16
    placement = plan_placement(load_index(tmp_path / "half"), memory_budget="1GiB", max_resident_layers=0,
                               num_buffers=2)
    streamed = load_streamed_target(tmp_path / "half", placement=placement, device="cuda",
                                    streamer_options={"gpu_path": gpu_path})
    try:
        for _ in range(3):
            for a, b in zip(_prompt_then_tree(resident), _prompt_then_tree(streamed.model)):
                assert a.dtype == torch.float16
                assert torch.equal(a, b), f"max |diff| {float((a.float() - b.float()).abs().max())}"
        _report(f"fp16-bitwise-{gpu_path}", passes=streamed.passes, equal=True)
    finally:
        streamed.close()


SLOW_CYCLES = 20_000_000  # torch.cuda._sleep: ~10 ms of GPU time


@pytest.mark.parametrize("gpu_path,slow", [("copy", "compute"), ("copy", "copy"), ("zero-copy", "compute")])
def test_release_ordering_under_slow_kernels(gpu_models, monkeypatch, gpu_path, slow):
    """A slow kernel before each layer's compute (or before each upload, on the side stream): a slot
    or a host buffer reused before the kernels reading it had run would change the logits."""
    from llmcad.streaming import gpu_upload

    dirs, models = gpu_models
    if slow == "copy":
        original = gpu_upload.UploadRing.upload

        def slow_upload(ring, key, host, on_copied=None):
            with torch.cuda.stream(ring.side):
                torch.cuda._sleep(SLOW_CYCLES)
            return original(ring, key, host, on_copied)

        monkeypatch.setattr(gpu_upload.UploadRing, "upload", slow_upload)
    streamed = _streamed(dirs, gpu_path)
    handles = []
    if slow == "compute":
        for i in streamed.placement.streamed_layers:
            handles.append(streamed.layers[i].register_forward_pre_hook(lambda m, a: torch.cuda._sleep(SLOW_CYCLES)))
    try:
        want = [t.clone() for t in _prompt_then_tree(models["target"])]
        for _ in range(5):  # as test_streamed_logits_match_resident_on_gpu: overwritten bytes are far off
            for a, b in zip(want, _prompt_then_tree(streamed.model)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert streamed.stats()["gpu"]["host_held"] == 0
        _report(f"release-order-{gpu_path}-{slow}", passes=streamed.passes)
    finally:
        for h in handles:
            h.remove()
        streamed.close()


def test_device_ring_in_stats_on_gpu(gpu_models):
    dirs, _ = gpu_models
    streamed = _streamed(dirs, "copy")
    try:
        stats = streamed.stats()
        assert stats["device_ring_bytes"] == stats["gpu"]["device_bytes"] > 0
        assert stats["memory_bytes"] == streamed.memory_bytes >= stats["resident_bytes"] + stats["device_ring_bytes"]
    finally:
        streamed.close()
