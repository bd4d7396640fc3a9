"""Weight-only int8 / int4 targets: the offline packing, the kernels' linear, and losslessness of every
mode (resident and streamed) against the quantized target's own greedy and seeded output (fp32)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pair_models
from llmcad import LLMCad
from llmcad.errors import ModelLoadError
from llmcad.models import quantize as quant
from llmcad.models.loading import load_causal_lm
from llmcad.models.prepare import prepare
from llmcad.speculative.policy import make_policy
from llmcad.streaming.quantized import QuantizedLinear, _cpu_block_rows, cpu_int4_layout
from llmcad.streaming.weights import load_index

SCHEMES = [("int8", None), ("int4", 32)]
AWKWARD_ROWS = (1, 2, 7, 63, 65)
PROMPT = "def add(a, b):"
NEW_TOKENS = 16
MODE_OPTIONS = [
    ("target-only", {}),
    ("chain", {}),
    ("tree", {}),
    ("tree", {"max_tree_tokens": 3, "max_depth": 2}),
    ("llmcad", {}),
    ("llmcad", {"branch_threshold": 0.05, "max_tree_tokens": 12, "alpha": 0.2, "alpha_rule": "paper"}),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The packed kernels split even tiny matrices across threads; on a loaded shared CPU each such
    barrier can cost tens of milliseconds, so these tiny-model tests run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quantized_dirs(tiny_pair_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    built = {}

    def get(family: str, scheme: str, kind: str = "target"):
        key = (family, scheme, kind)
        if key not in built:
            group = dict(SCHEMES)[scheme]
            built[key] = prepare(tiny_pair_dirs(family)[kind], root / f"{family}-{kind}-{scheme}", "float32",
                                 quantize=scheme, group_size=group)
        return built[key]

    return get


@pytest.fixture(scope="module")
def quantized_models(quantized_dirs):
    loaded = {}

    def get(family: str, scheme: str, kind: str = "target"):
        key = (family, scheme, kind)
        if key not in loaded:
            loaded[key] = load_causal_lm(quantized_dirs(family, scheme, kind))
        return loaded[key]

    return get


def _generate_reference(model, ids, n=NEW_TOKENS):
    ids = torch.tensor([ids])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False)[0, ids.shape[1]:].tolist()


# ---- packing ----
@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (1040, 64)])
def test_int4_pack_round_trip_and_error_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    packed = quant.quantize_int4(w, 32, torch.float32)
    assert packed["qweight"].dtype == torch.uint8 and packed["qweight"].shape == (shape[0], shape[1] // 2)
    codes = quant.unpack_nibbles(packed["qweight"])
    assert torch.equal(quant.pack_nibbles(codes), packed["qweight"])
    assert int(codes.max()) <= 15
    err = (quant.dequantize(packed, "int4", 32) - w).abs().reshape(shape[0], -1, 32)
    assert (err <= packed["scales"][..., None] / 2 + 1e-6).all()  # nearest grid point within the group's range


def test_int8_per_channel_error_bound():
    torch.manual_seed(1)
    w = torch.randn(40, 72) * torch.linspace(0.01, 3, 40)[:, None]
    packed = quant.quantize_int8(w, torch.float32)
    assert packed["qweight"].dtype == torch.int8 and int(packed["qweight"].abs().max()) == 127
    err = (quant.dequantize(packed, "int8") - w).abs()
    assert (err <= packed["scales"][:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 144, 1040])
def test_cpu_int4_layout_equals_torchs_conversion_op(rows):
    """The vectorized rearrangement (and the blockwise op for tails) gives torch's own op's bytes."""
    from llmcad.streaming.quantized import _convert_by_op

    torch.manual_seed(rows)
    q = torch.randint(0, 16, (rows, 96), dtype=torch.uint8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1).view(torch.uint8)
    assert torch.equal(cpu_int4_layout(quant.pack_nibbles(q)), whole.reshape(rows, 48))
    assert torch.equal(_convert_by_op(quant.pack_nibbles(q)), whole.reshape(rows, 48))


def test_cpu_int4_layout_at_awkward_sizes_and_reused_scratch():
    """Shapes growing and shrinking (the scratch buffer is reused), K not a power of two, tails of 16 and
    48 rows: each result equals torch's op, and an earlier result is not overwritten by a later call."""
    # the op wants N % 16 == 0
    shapes = [(1040, 80), (64, 32), (208, 448), (48, 64), (112, 96), (1136, 160), (16, 32), (128, 4480)]
    results = []
    for i, (rows, k) in enumerate(shapes):
        q = torch.randint(0, 16, (rows, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1).view(torch.uint8)
        got = cpu_int4_layout(quant.pack_nibbles(q))
        assert torch.equal(got, want.reshape(rows, k // 2)), (rows, k)
        results.append((got, got.clone()))
    assert all(torch.equal(got, kept) for got, kept in results)


def test_cpu_int4_layout_from_concurrent_threads():
    from concurrent.futures import ThreadPoolExecutor

    def convert(seed: int) -> bool:
        q = torch.randint(0, 16, (64 * (seed + 1), 96), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(seed))
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1).view(torch.uint8)
        return all(torch.equal(cpu_int4_layout(quant.pack_nibbles(q)), want.reshape(q.shape[0], 48))
                   for _ in range(20))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(convert, range(8)))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="torch's x86 block widths (AVX2: 32, AVX-512: 64)")
def test_this_cpu_uses_the_vectorized_rearrangement():
    assert _cpu_block_rows() in (32, 64)


@pytest.mark.parametrize("scheme,group", SCHEMES + [("int4", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_matches_dequantized_weight(scheme, group, dtype):
    torch.manual_seed(3)
    n, k = 48, 128
    w, bias = torch.randn(n, k), torch.randn(n)
    packed = quant.quantize_int8(w, dtype) if scheme == "int8" else quant.quantize_int4(w, group, dtype)
    layer = QuantizedLinear(k, n, bias=True, scheme=scheme, group_size=group, dtype=dtype, device="cpu")
    for name, t in dict(packed, bias=bias.to(dtype)).items():
        getattr(layer, name).data = t
    reference = quant.dequantize(packed, scheme, group)
    tol = 1e-4 if dtype == torch.float32 else 0.15
    for packed_once in (False, True):
        if packed_once:
            layer.pack()
        for rows in AWKWARD_ROWS:
            x = torch.randn(1, rows, k).to(dtype)
            want = x.float() @ reference.T + bias.to(dtype).float()
            got = layer(x)
            assert got.shape == (1, rows, n) and got.dtype == dtype
            assert (got.float() - want).abs().max() < tol * want.abs().max(), (rows, packed_once)


@pytest.mark.parametrize("n, k, group", [(48, 128, 32), (16, 64, 64), (96, 256, 128)])
def test_packed_int4_interleaves_scales_and_zeros_once(monkeypatch, n, k, group):
    """pack() lays an int4 layer's scales and zeros out as its kernels take them (two views of one
    tensor: the same bytes), so a forward builds nothing; the output is the unpacked layer's, bit for bit,
    and a layer whose views were replaced builds the operand again."""
    from llmcad.streaming.budget import module_bytes

    torch.manual_seed(4)
    packed = quant.quantize_int4(torch.randn(n, k), group, torch.float32)
    layer = QuantizedLinear(k, n, bias=False, scheme="int4", group_size=group, dtype=torch.float32, device="cpu")
    for name, t in packed.items():
        getattr(layer, name).data = t
    x = torch.randn(7, k)
    want, before = layer(x), module_bytes(layer)
    layer.pack()
    assert torch.equal(layer.scales, packed["scales"]) and torch.equal(layer.zeros, packed["zeros"])
    assert layer.scales.untyped_storage().data_ptr() == layer.zeros.untyped_storage().data_ptr()
    assert module_bytes(layer) == before - packed["qweight"].numel() + layer.qweight.numel()
    stack = torch.stack
    calls = []
    monkeypatch.setattr(torch, "stack", lambda *a, **kw: calls.append(1) or stack(*a, **kw))
    assert torch.equal(layer(x), want) and not calls
    layer.scales.data = layer.scales.data.clone()  # no longer a view: the operand is built again
    assert torch.equal(layer(x), want) and calls


@pytest.mark.parametrize("scheme,group", SCHEMES)
@pytest.mark.parametrize("threads", [1, 2])
def test_quantized_linear_rows_do_not_change_each_others_rounding(scheme, group, threads):
    """fp32 losslessness needs a tree pass's row to be computed bit for bit as a one-token pass computes
    it: a block of rows equals the rows one at a time, resident (packed once) and streamed (converted in
    the forward), for the tiny models' shapes."""
    torch.manual_seed(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, k in [(32, 32), (16, 32), (64, 32), (64, 64), (128, 64), (64, 128), (96, 96), (192, 96)]:
            packed = (quant.quantize_int8(torch.randn(n, k), torch.float32) if scheme == "int8"
                      else quant.quantize_int4(torch.randn(n, k), group, torch.float32))
            layer = QuantizedLinear(k, n, bias=True, scheme=scheme, group_size=group, dtype=torch.float32,
                                    device="cpu")
            for name, t in dict(packed, bias=torch.randn(n)).items():
                getattr(layer, name).data = t
            for packed_once in (False, True):
                if packed_once:
                    layer.pack()
                x = torch.randn(40, k)
                alone = torch.cat([layer(x[i:i + 1]) for i in range(40)])
                for rows in (2, 3, 4, 5, 16, 17, 40):
                    assert torch.equal(layer(x[:rows]), alone[:rows]), (n, k, rows, packed_once)
    finally:
        torch.set_num_threads(before)


# ---- prepare ----
@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_prepare_writes_one_range_per_layer_and_records_the_scheme(quantized_dirs, tiny_pair_dirs, scheme, group):
    out = quantized_dirs("qwen2", scheme)
    record = json.loads((out / "config.json").read_text())[quant.CONFIG_KEY]
    assert record["scheme"] == scheme and record["group_size"] == group
    assert "self_attn.q_proj" in record["modules"] and "mlp.down_proj" in record["modules"]
    index, float_index = load_index(out), load_index(tiny_pair_dirs("qwen2")["target"])
    for i in range(index.num_layers):
        assert len(index.layer_ranges(i).ranges) == 1
        names = {t.name.rsplit(".", 1)[-1] for t in index.layers[i]}
        assert "qweight" in names and ("zeros" in names) == (scheme == "int4")
    ratio = index.layer_bytes(0) / float_index.layer_bytes(0)
    assert ratio < (0.3 if scheme == "int8" else 0.2)  # fp32 source: 4 bytes a weight, 1 or 1/2 + scales


@pytest.mark.parametrize("scheme", [s for s, _ in SCHEMES])
def test_prepared_weights_start_64_byte_aligned(quantized_dirs, scheme):
    """Streamed views lie at their file offsets modulo the page: with 64-aligned data and sizes that are
    multiples of 64, every quantized weight needs no aligned copy before the int8 kernel."""
    index = load_index(quantized_dirs("llama", scheme))
    assert all(t.offset % 64 == 0 for layer in index.layers for t in layer if t.name.endswith(".qweight"))


def test_prepare_rejects_bad_schemes_and_shapes(tiny_pair_dirs, tmp_path):
    src = tiny_pair_dirs("llama")["target"]
    with pytest.raises(ModelLoadError, match="int8, int4"):
        prepare(src, tmp_path / "a", "float32", quantize="int3")
    with pytest.raises(ModelLoadError, match="--group-size 48"):
        prepare(src, tmp_path / "b", "float32", quantize="int4", group_size=48)
    with pytest.raises(ModelLoadError, match="int4 only"):
        prepare(src, tmp_path / "c", "float32", quantize="int8", group_size=32)
    with pytest.raises(ModelLoadError, match="divisible by the group size"):
        prepare(src, tmp_path / "d", "float32", quantize="int4", group_size=256)  # hidden 64


def test_cli_prepare_quantize(tiny_pair_dirs, tmp_path, capsys):
    from llmcad.cli import main

    assert main(["prepare", str(tiny_pair_dirs("llama")["target"]), "-o", str(tmp_path / "q"), "--dtype",
                 "float32", "--quantize", "int4", "--group-size", "64"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())[quant.CONFIG_KEY]["group_size"] == 64
    assert main(["prepare", str(tiny_pair_dirs("llama")["target"]), "-o", str(tmp_path / "r"),
                 "--quantize", "int4", "--group-size", "100"]) == 2
    assert "--group-size 100" in capsys.readouterr().err


@pytest.mark.parametrize("scheme,group", SCHEMES)
def test_resident_quantized_model_is_its_dequantized_weights(quantized_dirs, tiny_pair_dirs, scheme, group):
    from safetensors.torch import load_file

    out = quantized_dirs("qwen2", scheme)
    model, reference = load_causal_lm(out), load_causal_lm(tiny_pair_dirs("qwen2")["target"])
    stored = load_file(out / "model.safetensors")
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                parts = {k.rsplit(".", 1)[-1]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == name}
                module.weight.copy_(quant.dequantize(parts, scheme, group))
        ids = torch.tensor([[5, 17, 42, 7, 99]])
        got, want = model(ids).logits, reference(ids).logits
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


# ---- every dimension, mode and placement, in a child process (a kernel crash fails the test) ----
ODD_SHAPES = [("llama", 64), ("qwen2", 48), ("mistral", 80), ("phi3", 96)]  # (family, hidden): 4 heads, 2 KV
CHILD_TOKENS = 10


@pytest.fixture(scope="module")
def odd_pairs(tiny_tokenizer, tmp_path_factory):
    """{(family, hidden): (draft dir, fp32 target dir)}: 4-layer targets, vocabulary 320, and their first
    2 layers as the draft."""
    from llmcad.bench.tiny_pair import truncated_copy

    root = tmp_path_factory.mktemp("odd")
    pairs = {}
    for family, hidden in ODD_SHAPES:
        target = pair_models.random_model(family, seed=hidden, hidden=hidden, vocab_size=320)
        pairs[(family, hidden)] = (pair_models.save(truncated_copy(target, 2), tiny_tokenizer, root / f"{family}-d"),
                                   pair_models.save(target, tiny_tokenizer, root / f"{family}-t"))
    return pairs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_odd_dimensions_in_every_mode_and_placement(odd_pairs, tmp_path, monkeypatch, dtype):
    """int8 and int4 targets of hidden 48 / 64 / 80 / 96, resident, every layer streamed at the engine's
    least budget (every mode), and partly streamed above it (see quantized_child). fp32: every run equals the
    resident target-only run. bfloat16 (prepare's default; its int8 kernel's aligned loads once crashed on
    streamed views): every run completes and target-only gives the same tokens in every placement. The
    bfloat16 checkpoints are written 8-byte aligned, as prepare wrote them before, so views are misaligned."""
    if dtype == "bfloat16":
        from llmcad.models import convert

        monkeypatch.setattr(convert, "DATA_ALIGN", 8)
    jobs = []
    for (family, hidden), (draft, target) in odd_pairs.items():
        for scheme, group in SCHEMES:
            out = tmp_path / f"{family}-{hidden}-{scheme}"
            if scheme == "int4" and hidden % group:
                with pytest.raises(ModelLoadError, match="divisible by the group size"):
                    prepare(target, out, dtype, quantize=scheme, group_size=group)
                continue
            jobs += [str(draft), str(prepare(target, out, dtype, quantize=scheme, group_size=group))]
    if dtype == "bfloat16":  # the crash's case: some weight view off the kernel's 16-byte alignment
        assert any(t.offset % 16 for target in jobs[1::2] for layer in load_index(target).layers for t in layer
                   if t.name.endswith(".qweight"))
    child = Path(__file__).with_name("quantized_child.py")
    proc = subprocess.run([sys.executable, str(child), str(CHILD_TOKENS), *jobs], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"the child exited with {proc.returncode} (negative: killed by that signal): " \
                                 f"{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(jobs) // 2
    for target, runs in results.items():
        want = runs["resident/target-only"]["tokens"]
        assert want and runs["least/target-only"]["streamed"] == 4 and 0 < runs["midpoint/tree"]["streamed"] < 4
        for key, run in runs.items():
            if dtype == "float32" or key.endswith("/target-only"):
                assert run["tokens"] == want, (target, key)
            else:  # bf16 tree passes may round differently (README): the run completes
                assert 0 < len(run["tokens"]) <= CHILD_TOKENS, (target, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_kernel_on_misaligned_views_in_a_child(dtype):
    """Weights, scales and activations at every small byte offset from a 64-byte boundary (a streamed
    layer's views sit wherever the file put them), K a multiple of 16 or not: the product equals the
    dequantized weight's, and the process survives (the check runs in a child)."""
    code = f"""
import torch
from llmcad.streaming.quantized import int8_cpu_mm
dtype = {dtype}
def at(offset, shape, dt):
    raw = torch.empty(16384 + 128, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 64 + offset
    n = torch.Size(shape).numel() * dt.itemsize
    return raw[start:start + n].view(dt).view(shape)
gen = torch.Generator().manual_seed(0)
for n, k in [(64, 64), (32, 48), (96, 80), (24, 40)]:
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    s = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    for w_off, x_off, s_off in [(0, 0, 0), (8, 0, 1), (24, 1, 0), (0, 2, 3), (1, 4, 1), (48, 8, 2)]:  # bytes, items
        for rows in (1, 2, 4, 5, 12):
            wv, xv = at(w_off, (n, k), torch.int8), at(x_off * dtype.itemsize, (rows, k), dtype)
            sv = at(s_off * dtype.itemsize, (n,), dtype)
            wv.copy_(w); sv.copy_(s); xv.copy_(torch.randn(rows, k, generator=gen).to(dtype))
            want = xv.float() @ (w.float() * s.float()[:, None]).T
            got = int8_cpu_mm(xv, wv, sv).float()
            assert got.shape == (rows, n) and (got - want).abs().max() <= 0.02 * want.abs().max(), (n, k, w_off, x_off, rows)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-3000:])


def test_int8_linear_refuses_mismatched_operands():
    from llmcad.streaming.quantized import int8_cpu_mm

    w, s = torch.zeros(8, 16, dtype=torch.int8), torch.ones(8)
    with pytest.raises(ValueError, match="int8 linear"):
        int8_cpu_mm(torch.zeros(2, 16, dtype=torch.bfloat16), w, s)  # scales not in the activations' dtype
    with pytest.raises(ValueError, match="int8 linear"):
        int8_cpu_mm(torch.zeros(2, 12), w, s)


# ---- bad scales ----
@pytest.mark.parametrize("part,value", [("scales", float("nan")), ("scales", float("inf")), ("scales", 0.0),
                                        ("zeros", float("-inf"))])
@pytest.mark.parametrize("streamed", [False, True])
def test_bad_scales_are_refused_at_load_naming_tensor_and_file(quantized_dirs, tmp_path, part, value, streamed):
    import shutil

    from safetensors.torch import load_file

    from llmcad.errors import WeightFileError
    from llmcad.streaming.budget import plan_placement
    from llmcad.streaming.streamed import load_streamed_target

    out = shutil.copytree(quantized_dirs("qwen2", "int4"), tmp_path / "bad")
    state = {k: v.clone() for k, v in load_file(out / "model.safetensors").items()}  # not the mapped file
    name = f"model.layers.2.mlp.up_proj.{part}"
    state[name].view(-1)[5] = value
    quant.write_safetensors(out / "model.safetensors", state)
    with pytest.raises(WeightFileError, match=rf"model.safetensors: '{name}' holds .* at element 5; quantization"):
        if streamed:
            placement = plan_placement(load_index(out), memory_budget="1GiB", max_resident_layers=0)
            load_streamed_target(out, placement=placement).close()
        else:
            load_causal_lm(out)


def test_int8_scales_of_a_zero_row_are_not_zero_in_float16():
    w = torch.randn(4, 32)
    w[1] = 0
    packed = quant.quantize_int8(w, torch.float16)
    assert (packed["scales"] > 0).all() and (packed["qweight"][1] == 0).all()
    packed = quant.quantize_int4(w, 32, torch.float16)
    assert (packed["scales"] > 0).all() and torch.equal(quant.dequantize(packed, "int4", 32)[1], torch.zeros(32))


# ---- losslessness ----
@pytest.mark.parametrize("scheme", [s for s, _ in SCHEMES])
@pytest.mark.parametrize("family", pair_models.FAMILIES)
def test_every_mode_equals_the_quantized_targets_greedy_output(quantized_models, tiny_models, tiny_tokenizer,
                                                               family, scheme):
    target = quantized_models(family, scheme)
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    expected = _generate_reference(target, ids)
    for mode, options in MODE_OPTIONS:
        eng = LLMCad(tiny_models(family, "shared"), target, tiny_tokenizer, make_policy(mode, **options))
        assert eng.generate(PROMPT, NEW_TOKENS).tokens == expected, (family, scheme, mode, options)


@pytest.mark.parametrize("scheme", [s for s, _ in SCHEMES])
def test_quantized_draft_and_target_together(quantized_models, tiny_tokenizer, scheme):
    target, draft = quantized_models("llama", scheme), quantized_models("llama", scheme, "shared")
    expected = _generate_reference(target, tiny_tokenizer(PROMPT)["input_ids"])
    result = LLMCad(draft, target, tiny_tokenizer, make_policy("llmcad")).generate(PROMPT, NEW_TOKENS)
    assert result.tokens == expected
    assert result.stats["tokens_per_pass"] > 1  # the quantized draft gets tokens accepted


def test_int8_draft_prepared_by_the_cli_with_a_float_target(tiny_pair_dirs, tiny_models, tmp_path):
    """`llmcad prepare --quantize int8` on a draft; the engine loads it resident beside the float target,
    and greedy output equals the target's own (only the target decides)."""
    from llmcad.cli import main

    dirs = tiny_pair_dirs("qwen2")
    assert main(["prepare", str(dirs["shared"]), "-o", str(tmp_path / "draft-int8"), "--dtype", "float32",
                 "--quantize", "int8"]) == 0
    eng = LLMCad.from_pretrained(tmp_path / "draft-int8", dirs["target"], mode="llmcad")
    assert any(isinstance(m, QuantizedLinear) for m in eng.draft.modules())
    ids = eng.tokenizer(PROMPT)["input_ids"]
    result = eng.generate(ids, NEW_TOKENS)
    assert result.tokens == _generate_reference(tiny_models("qwen2", "target"), ids)
    assert result.stats["tokens_per_pass"] > 1  # the int8 draft's tokens are accepted


@pytest.mark.parametrize("mode", ["llmcad", "tree", "chain", "target-only"])
@pytest.mark.parametrize("scheme", [s for s, _ in SCHEMES])
@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_streamed_quantized_target_is_lossless_and_reads_packed_bytes(quantized_dirs, quantized_models, tiny_pair_dirs,
                                                                      family, scheme, mode):
    """Through the engine's own loading: a budget below draft + target streams every packed layer."""
    from llmcad.errors import BudgetError

    dirs = tiny_pair_dirs(family)
    with pytest.raises(BudgetError) as err:  # the smallest budget the plan accepts streams every layer
        LLMCad.from_pretrained(dirs["shared"], quantized_dirs(family, scheme), memory_budget=1)
    budget = int(err.value.args[0].split("(")[2].split(" bytes")[0])
    eng = LLMCad.from_pretrained(dirs["shared"], quantized_dirs(family, scheme), mode=mode, memory_budget=budget)
    try:
        assert eng.placement.resident_layers == [] and eng.placement.streamed_layers
        index = load_index(quantized_dirs(family, scheme))
        assert eng.placement.bytes_per_pass == sum(index.layer_bytes(i) for i in range(index.num_layers))
        ids = eng.tokenizer(PROMPT)["input_ids"]
        expected = _generate_reference(quantized_models(family, scheme), ids)
        got = eng.generate(ids, NEW_TOKENS).tokens
        assert got == expected[:len(got)] and (len(got) == NEW_TOKENS or got[-1] in eng.eos_token_ids)
        ctl = eng.streamed
        # every packed layer per pass, plus the embedding rows read (each once: cached)
        assert ctl.passes > 0 and ctl.bytes_read == ctl.passes * eng.placement.bytes_per_pass + ctl.sparse_bytes_read
    finally:
        eng.close()


def test_budget_counts_packed_bytes(quantized_dirs, tiny_pair_dirs):
    from llmcad.streaming.budget import plan_placement

    plans = {s: plan_placement(load_index(quantized_dirs("llama", s)), memory_budget="1GiB", max_resident_layers=1)
             for s, _ in SCHEMES}
    plans["float"] = plan_placement(load_index(tiny_pair_dirs("llama")["target"]), memory_budget="1GiB",
                                    max_resident_layers=1)
    assert plans["int4"].bytes_per_pass < plans["int8"].bytes_per_pass < plans["float"].bytes_per_pass / 3
    for p in plans.values():
        assert p.buffer_bytes >= p.bytes_per_pass // len(p.streamed_layers)
    acct = {s: p.accounting["target_resident_layers"] for s, p in plans.items()}
    assert acct["int4"] < acct["int8"] < acct["float"]


@pytest.mark.parametrize("scheme", [s for s, _ in SCHEMES])
def test_seeded_sampling_is_reproducible_in_every_mode(quantized_models, tiny_models, tiny_tokenizer, scheme):
    target = quantized_models("llama", scheme)
    sampling = dict(do_sample=True, temperature=0.8, top_k=8, seed=11)
    for mode in ("target-only", "chain", "tree", "llmcad"):
        eng = LLMCad(tiny_models("llama", "shared"), target, tiny_tokenizer, make_policy(mode))
        first = eng.generate(PROMPT, NEW_TOKENS, **sampling).tokens
        assert eng.generate(PROMPT, NEW_TOKENS, **sampling).tokens == first, mode


def test_int4_sampling_follows_the_quantized_targets_distribution(quantized_models, tiny_models, tiny_tokenizer):
    from test_sampling import CHI2_CRITICAL_DF15_P001, RUNS, TOP_K, target_joint

    from llmcad.speculative.verify import TargetChooser

    target = quantized_models("llama", "int4")
    eng = LLMCad(tiny_models("llama", "shared"), target, tiny_tokenizer, make_policy("llmcad", branch_threshold=0.1))
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    sampling = dict(temperature=0.8, top_k=TOP_K)
    expected = target_joint(target, ids, TargetChooser(do_sample=True, **sampling))
    counts = torch.zeros_like(expected)
    for seed in range(RUNS):
        tokens = eng.generate(ids, 2, do_sample=True, seed=seed, **sampling).tokens
        counts[tokens[0], tokens[1]] += 1
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the target's top-k support was emitted"
    e, o = expected[support] * RUNS, counts[support]
    assert float(((o - e) ** 2 / e).sum()) < CHI2_CRITICAL_DF15_P001


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.cuda
@_CUDA
@pytest.mark.parametrize("scheme,group", SCHEMES + [("int4", 128)])
def test_cuda_quantized_linear_matches_dequantized_weight(scheme, group):
    torch.manual_seed(4)
    n, k = 256, 256
    w = torch.randn(n, k)
    packed = quant.quantize_int8(w, torch.bfloat16) if scheme == "int8" else quant.quantize_int4(w, group, torch.bfloat16)
    layer = QuantizedLinear(k, n, bias=False, scheme=scheme, group_size=group, dtype=torch.bfloat16, device="cuda")
    for name, t in packed.items():
        getattr(layer, name).data = t.cuda()
    reference = quant.dequantize(packed, scheme, group)
    for packed_once in (False, True):
        if packed_once:
            layer.pack()
        for rows in AWKWARD_ROWS:
            x = torch.randn(rows, k).to(torch.bfloat16)
            want = x.float() @ reference.T
            got = layer(x.cuda()).float().cpu()
            assert (got - want).abs().max() < 0.05 * want.abs().max(), (rows, packed_once)


@pytest.mark.cuda
@_CUDA
@pytest.mark.parametrize("scheme", [s for s, _ in SCHEMES])
def test_cuda_every_mode_equals_the_quantized_targets_greedy_output(quantized_dirs, tiny_pair_dirs, tiny_tokenizer,
                                                                    scheme):
    target = load_causal_lm(quantized_dirs("qwen2", scheme), device="cuda")
    draft = load_causal_lm(tiny_pair_dirs("qwen2")["shared"], device="cuda")
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    x = torch.tensor([ids], device="cuda")
    expected = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               do_sample=False)[0, len(ids):].tolist()
    for mode, options in MODE_OPTIONS:
        eng = LLMCad(draft, target, tiny_tokenizer, make_policy(mode, **options))
        assert eng.generate(PROMPT, NEW_TOKENS).tokens == expected, (scheme, mode, options)


def test_bench_pass_variants_report_ratios_against_the_base(quantized_dirs, tiny_pair_dirs, capsys):
    from llmcad.cli import main

    assert main(["bench", "pass", "--target", str(tiny_pair_dirs("qwen2")["target"]), "--variant",
                 f"int8={quantized_dirs('qwen2', 'int8')}", "--variant", f"int4={quantized_dirs('qwen2', 'int4')}",
                 "--cap", "50MB/s", "--repeats", "1", "--tree-nodes", "4", "--prefix", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    records = {(r["setting"], r["variant"]): r for r in report["records"]}
    assert set(records) == {(s, v) for s in ("native", "cap50") for v in ("fp32", "int8", "int4")}
    for setting in ("native", "cap50"):
        assert records[(setting, "fp32")]["bytes_ratio"] == 1.0
        assert records[(setting, "int4")]["bytes_ratio"] < records[(setting, "int8")]["bytes_ratio"] < 0.3
        assert records[(setting, "int4")]["quantize"] == "int4" and records[(setting, "int4")]["layout_s"] > 0
        assert records[(setting, "int8")]["layout_s"] == 0
    assert records[("cap50", "int4")]["cap"] == 50e6
