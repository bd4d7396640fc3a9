"""A cheaper draft: a packed (int8 / int4) draft with tied embeddings and a draft whose output layer keeps
only N tokens (draft vocabulary pruning). Output stays the target's own in every mode, greedy and seeded
sampling, with and without a memory budget; the budget counts the draft as it is held."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pair_models
from llmcad import LLMCad
from llmcad.bench.tiny_pair import truncated_copy
from llmcad.errors import BudgetError
from llmcad.models import draft_head, loading
from llmcad.models import vocab as draft_vocab
from llmcad.models.prepare import prepare
from llmcad.speculative.draft import TreeDrafter
from llmcad.streaming.budget import module_bytes

PROMPT = "def add(a, b):"
NEW_TOKENS = 16
MODES = ("target-only", "chain", "tree", "llmcad")
PRUNED = 64  # of the tiny tokenizer's 300 tokens
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=8, seed=5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The packed kernels split tiny matrices across threads; one thread keeps these tests quick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """$LLMCAD_HOME in a temporary directory: the tiny tokenizer's ranking is computed and cached there."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("llmcad-home")
        mp.setenv("LLMCAD_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def tied(tmp_path_factory, tiny_tokenizer, home):
    """A target and a draft (its first two layers) whose output layers are their input embeddings, as the
    real draft's; the draft also packed as int8 and int4."""
    root = tmp_path_factory.mktemp("tied")
    target = pair_models.random_model("qwen2", seed=31)
    target.config.tie_word_embeddings = True
    target.model.embed_tokens.weight = target.lm_head.weight
    dirs = {"target": pair_models.save(target, tiny_tokenizer, root / "target")}
    dirs["float"] = pair_models.save(truncated_copy(target, 2), tiny_tokenizer, root / "draft")
    for scheme, group in (("int8", None), ("int4", 32)):
        dirs[scheme] = prepare(dirs["float"], root / f"draft-{scheme}", "float32", quantize=scheme, group_size=group)
    return dirs


@pytest.fixture(scope="module")
def expected(tied, tiny_tokenizer):
    """The target's own greedy tokens (transformers' generate) and the prompt's ids."""
    model = loading.load_causal_lm(tied["target"])
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids, out[0, len(ids):].tolist()


def _engine(tied, draft, mode, budget, vocab=None, head="auto", **options):
    if budget == "least":
        budget = pair_models.least_budget(tied[draft], tied["target"], draft_vocab=vocab, draft_head=head)
    return LLMCad.from_pretrained(tied[draft], tied["target"], mode=mode, memory_budget=budget, draft_vocab=vocab,
                                  draft_head=head, **options)


def test_fixture_drafts_are_tied_and_packed(tied):
    for draft in ("float", "int8", "int4"):
        model = loading.load_causal_lm(tied[draft])
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), draft
    assert json.loads((tied["int8"] / "config.json").read_text())["llmcad_quantization"]["scheme"] == "int8"


@pytest.mark.parametrize("budget", [None, "least"])
@pytest.mark.parametrize("draft,vocab,head", [("int8", None, "auto"), ("int4", None, "auto"), ("float", PRUNED, "auto"),
                                              ("int8", PRUNED, "auto"), ("int4", PRUNED, "auto"),
                                              ("float", None, "int8"), ("int8", None, "float")])
def test_greedy_output_is_the_targets_in_every_mode(tied, expected, draft, vocab, head, budget):
    ids, want = expected
    for mode in MODES:
        with _engine(tied, draft, mode, budget, vocab, head) as eng:
            assert eng.generate(ids, NEW_TOKENS).tokens == want, (draft, vocab, budget, mode)
            if budget is not None:
                assert eng.placement.streamed_layers  # the least budget streams the target
            again = eng.generate(ids, NEW_TOKENS)  # from the prefix cache's KV of the first generation
            assert again.tokens == want and again.stats["cached_tokens"] > 0, (draft, vocab, budget, mode)


@pytest.mark.parametrize("budget", [None, "least"])
@pytest.mark.parametrize("draft,vocab", [("int8", None), ("int8", PRUNED), ("int4", PRUNED)])
def test_seeded_sampling_equals_target_only(tied, expected, draft, vocab, budget):
    ids, _ = expected
    with _engine(tied, draft, "target-only", budget, vocab) as eng:
        want = eng.generate(ids, NEW_TOKENS, **SAMPLING).tokens
    for mode in MODES[1:]:
        with _engine(tied, draft, mode, budget, vocab) as eng:
            assert eng.generate(ids, NEW_TOKENS, **SAMPLING).tokens == want, (draft, vocab, budget, mode)


def test_packed_draft_budget_is_checked_before_anything_loads(tied, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the budget was checked")

    monkeypatch.setattr(loading, "load_causal_lm", no_loading)
    for draft in ("int8", "int4"):
        with pytest.raises(BudgetError, match="needs at least"):
            LLMCad.from_pretrained(tied[draft], tied["target"], memory_budget=1)


@pytest.mark.parametrize("head", ["auto", "float", "int8"])
@pytest.mark.parametrize("vocab", [None, PRUNED])
@pytest.mark.parametrize("draft", ["float", "int8", "int4"])
def test_draft_footprint_is_the_loaded_drafts_bytes(tied, draft, vocab, head):
    _, footprint, _ = loading.draft_footprint(tied[draft], draft_vocab=vocab, draft_head=head)
    with LLMCad.from_pretrained(tied[draft], tied["target"], draft_vocab=vocab, draft_head=head) as eng:
        assert footprint == module_bytes(eng.draft)


def test_pruned_head_holds_only_its_rows(tied, tiny_models):
    """An untied head is replaced by its N rows; a tied one keeps the embeddings and adds the N rows."""
    hidden, vocab = 64, pair_models.VOCAB_SIZE
    untied_dir = pair_models.build_family(tied["target"].parent / "untied", "qwen2")["shared"]
    for source, extra in ((untied_dir, (PRUNED - vocab) * hidden * 4), (tied["float"], PRUNED * hidden * 4)):
        full = module_bytes(loading.load_causal_lm(source))
        with LLMCad.from_pretrained(source, tied["target"], draft_vocab=PRUNED) as eng:
            assert tuple(eng.draft.lm_head.weight.shape) == (PRUNED, hidden)
            assert module_bytes(eng.draft) == full + extra
            ids = eng.draft_vocab_ids
            reference = loading.load_causal_lm(source).lm_head.weight
            assert torch.equal(eng.draft.lm_head.weight, reference[ids])


def test_the_pruned_draft_never_proposes_a_token_outside_its_set(tied, expected, monkeypatch):
    """Every token the draft proposes (its top tokens of every forward) is in the kept set; the full draft,
    same prompt, proposes tokens outside it (so the check can fail)."""
    ids, want = expected
    proposed = []
    top = TreeDrafter._top

    def spy(self, logits):
        p, t = top(self, logits)
        proposed.append(t.reshape(-1))
        return p, t

    monkeypatch.setattr(TreeDrafter, "_top", spy)
    with _engine(tied, "float", "llmcad", None, PRUNED, prompt_lookup=False) as eng:
        kept = set(eng.draft_vocab_ids.tolist())
        assert eng.generate(ids, NEW_TOKENS).tokens == want
    assert len(kept) == PRUNED and proposed and set(torch.cat(proposed).tolist()) <= kept
    proposed.clear()
    with _engine(tied, "float", "llmcad", None, None, prompt_lookup=False) as eng:
        eng.generate(ids, NEW_TOKENS)
    assert set(torch.cat(proposed).tolist()) - kept


def test_kept_ids_hold_special_and_end_tokens_then_the_ranking(tiny_tokenizer, home):
    ids = draft_vocab.kept_ids(tiny_tokenizer, 10, 300, always=[7])
    specials = set(tiny_tokenizer.all_special_ids) | {7}
    assert ids.dtype == torch.long and len(ids) == 10 and torch.equal(ids, ids.sort().values)
    assert specials <= set(ids.tolist())
    ranked = [i for i in draft_vocab.ranking(tiny_tokenizer).tolist() if i not in specials]
    assert set(ids.tolist()) == specials | set(ranked[:10 - len(specials)])
    with pytest.raises(ValueError, match="special"):
        draft_vocab.kept_ids(tiny_tokenizer, 2, 300)


def test_ranking_of_another_tokenizer_is_computed_once_and_cached(tiny_tokenizer, home):
    path = home / "draft-vocab" / f"{draft_vocab.tokenizer_key(tiny_tokenizer)}.npy"
    first = draft_vocab.ranking(tiny_tokenizer)
    assert path.is_file()
    assert np.array_equal(np.load(path), first) and len(set(first.tolist())) == len(first)
    np.save(path, first[::-1].copy())  # the cached file is what is read from then on
    assert np.array_equal(draft_vocab.ranking(tiny_tokenizer), first[::-1])
    np.save(path, first)


def test_shipped_rankings_are_distinct_token_ids():
    files = sorted(draft_vocab.SHIPPED.glob("*.npy"))
    assert files, "the Qwen2.5 tokenizer's ranking ships with the package"
    for f in files:
        ranked = np.load(f)
        assert ranked.dtype == np.int32 and len(np.unique(ranked)) == len(ranked) and ranked.min() >= 0
        assert len(f.stem) == 16


@pytest.mark.parametrize("value,want", [(None, None), (0, None), ("none", None), ("0", None), ("64", 64), (64, 64)])
def test_parse_draft_vocab(value, want):
    assert draft_vocab.parse_draft_vocab(value) == want


@pytest.mark.parametrize("value", ["abc", -1, 1.5, True])
def test_bad_draft_vocab_is_refused_before_loading(tied, value):
    with pytest.raises(ValueError, match="draft_vocab"):
        LLMCad.from_pretrained(Path("/nonexistent"), Path("/nonexistent"), draft_vocab=value)


def test_cli_draft_vocab(tied, expected, capsys):
    from llmcad.cli import main

    ids, want = expected
    base = ["generate", "--draft", str(tied["int8"]), "--target", str(tied["target"]), "--memory-budget", "none",
            "--prompt", PROMPT, "--raw", "--max-new-tokens", str(NEW_TOKENS), "--json"]
    assert main(base + ["--draft-vocab", str(PRUNED)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == want
    assert main(base + ["--draft-vocab", "many"]) == 2
    assert "--draft-vocab='many'" in capsys.readouterr().err


def test_bench_draft_reports_each_configuration_against_the_full_draft(tied, capsys):
    from llmcad.cli import main

    argv = ["bench", "draft", "--draft", str(tied["float"]), "--target", str(tied["target"]), "--variant",
            f"int8={tied['int8']}", "--draft-vocab", f"{PRUNED},0", "--rows", "1,4", "--kv-length", "20",
            "--warmup", "1", "--repeats", "2", "--new-tokens", "6", "--tiny", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    records = report["records"]
    assert [(r["draft"], r["draft_vocab"], r["quantize"]) for r in records] == [
        ("fp32", None, None), ("fp32", PRUNED, None), ("int8", None, "int8"), ("int8", PRUNED, "int8")]
    base = records[0]
    assert base["speedup"] == {"1": 1.0, "4": 1.0} and base["agreement_ratio"] == 1.0
    for r in records:
        assert set(r["forward_s"]) == {"1", "4"} and all(t > 0 for t in r["forward_s"].values())
        assert 0 <= r["agreement"] <= 1 and 0 <= r["agreement_generated"] <= 1
        assert r["agreement_ratio"] == pytest.approx(r["agreement"] / base["agreement"])
    assert records[1]["weight_bytes"] == base["weight_bytes"] + PRUNED * 64 * 4  # tied: the kept rows added
    assert records[2]["weight_bytes"] < base["weight_bytes"]
    # the tiny prompts and their continuations (6 tokens each), every position but each sequence's last
    from llmcad.bench.tiny_pair import PROMPTS
    tokenizer = loading.load_tokenizer(tied["target"])
    assert report["positions"] == sum(len(tokenizer(p)["input_ids"]) + 6 - 1 for p in PROMPTS)
    argv[argv.index("--json")] = "--quiet-none"
    assert main(argv[:-1]) == 0
    assert "| fp32 | full |" in capsys.readouterr().out


def test_vocab_ids_must_name_one_increasing_id_per_output_row(tiny_models, tiny_tokenizer):
    from llmcad.speculative.policy import make_policy

    draft, target = tiny_models("qwen2", "shared"), tiny_models("qwen2", "target")
    rows = draft.lm_head.weight.shape[0]
    for bad in (torch.arange(rows - 1), torch.arange(rows).flip(0), [0, 1]):
        with pytest.raises(ValueError, match="draft_vocab_ids"):
            LLMCad(draft, target, tiny_tokenizer, make_policy("llmcad"), draft_vocab_ids=bad)
    LLMCad(draft, target, tiny_tokenizer, make_policy("llmcad"), draft_vocab_ids=torch.arange(rows))


# ---- the draft's output layer packed at load (llmcad.models.draft_head) ----
@pytest.mark.parametrize("draft,vocab,head,want", [
    ("int8", None, "auto", "int8"), ("int4", None, "auto", "int8"),  # 300 rows: int4 needs a multiple of 16
    ("int4", PRUNED, "auto", "int4"), ("float", None, "auto", "float"), ("float", None, "int8", "int8"),
    ("int8", None, "float", "float"), ("float", PRUNED, "int4", "int4")])
def test_draft_head_is_held_as_asked(tied, expected, draft, vocab, head, want):
    ids, _ = expected
    with LLMCad.from_pretrained(tied[draft], tied["target"], draft_vocab=vocab, draft_head=head) as eng:
        assert getattr(eng.draft.lm_head, "scheme", "float") == want
        assert eng.generate(ids, 4).stats["draft_head"] == want
        table = eng.draft.get_input_embeddings()
        packed_table = want != "float" and vocab is None  # a tied full head packs the embeddings with it
        assert isinstance(table, draft_head.PackedEmbedding) == packed_table
        assert table.weight.shape == (pair_models.VOCAB_SIZE, 64) and table.weight.dtype == torch.float32
        if packed_table and want == "int8":  # one set of codes serves lookups and the head
            assert table.qweight.data_ptr() == eng.draft.lm_head.qweight.data_ptr()
        if want != "float":
            assert not eng.draft.config.tie_word_embeddings


def test_packed_head_is_the_quantized_float_layer(monkeypatch):
    """Packed a block of rows at a time (blocks that do not divide the rows), the layer computes what the
    whole weight quantized at once and dequantized computes, and its embedding table looks up those rows."""
    from llmcad.models.quantize import dequantize, quantize_int4, quantize_int8

    monkeypatch.setattr(draft_head, "_BLOCK_ROWS", 7)
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=True)  # 96 inputs: int4 groups of 32; 48 rows: a multiple of 16
    x = torch.randn(5, 96)
    weight, bias = linear.weight.detach(), linear.bias.detach().numpy()
    for scheme, group in (("int8", None), ("int4", 32)):
        assert draft_head.resolve(scheme, None, (48, 96), "cpu") == (scheme, group)
        whole = quantize_int8(weight, torch.float32) if scheme == "int8" else quantize_int4(weight, group, torch.float32)
        want = x.numpy() @ dequantize(whole, scheme, group).numpy().T + bias
        packed, table = draft_head.packed_head(linear, scheme, group, with_table=True)
        ids = torch.tensor([[47, 0, 3], [3, 46, 11]])
        with torch.inference_mode():
            got, rows = packed(x).numpy(), table(ids).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rows, dequantize(whole, scheme, group).numpy()[ids.numpy()], rtol=1e-6, atol=1e-6)
        assert rows.shape == (2, 3, 96) and table.weight.shape == (48, 96)
        assert draft_head.packed_head(linear, scheme, group)[1] is None
        assert not np.allclose(got, x.numpy() @ weight.numpy().T + bias, atol=1e-4)  # packed, not the float layer
    assert packed.out_features == 48 and packed.scheme == "int4"


def test_draft_head_choices():
    from llmcad.errors import ModelLoadError

    assert draft_head.resolve("auto", "int8", (300, 64), "cpu") == ("int8", None)
    assert draft_head.resolve("auto", "int4", (300, 64), "cpu") == ("int8", None)  # 300 rows: not int4
    assert draft_head.resolve("auto", "int4", (32, 256), "cpu") == ("int4", 128)
    assert draft_head.resolve("auto", None, (32, 64), "cpu") == (None, None)  # a float draft keeps its head
    assert draft_head.resolve("auto", "int8", (32, 64), "cuda") == (None, None)
    assert draft_head.resolve("float", "int8", (32, 64), "cpu") == (None, None)
    with pytest.raises(ModelLoadError, match=r"\[300, 64\] cannot be int4.*draft_head='int8'"):
        draft_head.resolve("int4", None, (300, 64), "cpu")
    assert draft_head.packed_bytes(300, 64, "int8", None, torch.bfloat16) == 300 * 64 + 300 * 2
    assert draft_head.packed_bytes(32, 256, "int4", 128, torch.float32) == 32 * 128 + 2 * 32 * 2 * 4


@pytest.mark.parametrize("value", ["int3", 8, "", True])
def test_bad_draft_head_is_refused_before_loading(value):
    with pytest.raises(ValueError, match="draft_head"):
        LLMCad.from_pretrained(Path("/nonexistent"), Path("/nonexistent"), draft_head=value)


def test_an_int4_head_the_kernels_cannot_hold_is_named(tied):
    from llmcad.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot be int4"):
        LLMCad.from_pretrained(tied["float"], tied["target"], draft_head="int4")


def test_cli_draft_head(tied, expected, capsys):
    from llmcad.cli import main

    ids, want = expected
    base = ["generate", "--draft", str(tied["float"]), "--target", str(tied["target"]), "--memory-budget", "none",
            "--prompt", PROMPT, "--raw", "--max-new-tokens", str(NEW_TOKENS), "--json"]
    assert main(base + ["--draft-head", "int8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == want and out["stats"]["draft_head"] == "int8"
    assert main(base + ["--draft-head", "int3"]) == 2
    assert "--draft-head" in capsys.readouterr().err


def test_bench_draft_reports_each_head(tied, capsys):
    from llmcad.cli import main

    argv = ["bench", "draft", "--draft", str(tied["float"]), "--target", str(tied["target"]), "--draft-head",
            "float,int8", "--draft-vocab", f"{PRUNED}", "--rows", "1,3", "--kv-length", "12", "--warmup", "1",
            "--repeats", "1", "--new-tokens", "4", "--tiny", "--json"]
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert [(r["draft_vocab"], r["draft_head"]) for r in records] == [
        (None, "float"), (None, "int8"), (PRUNED, "float"), (PRUNED, "int8")]
    hidden, rows = 64, pair_models.VOCAB_SIZE
    # tied: the int8 codes serve the head and the lookups, in place of the fp32 table; pruned: the kept rows added
    assert records[1]["weight_bytes"] == records[0]["weight_bytes"] - rows * hidden * 4 + rows * hidden + rows * 4
    assert records[3]["weight_bytes"] == records[0]["weight_bytes"] + PRUNED * hidden + PRUNED * 4
    assert all(0 <= r["agreement"] <= 1 for r in records)
    assert main(argv[:argv.index("--draft-head")] + ["--draft-head", "auto"] + argv[argv.index("--draft-head") + 2:]) == 2


@pytest.mark.parametrize("vocab,head", [(None, "int8"), (PRUNED, "int4")])
def test_an_untied_head_is_replaced_and_its_embeddings_stay_float(tied, expected, vocab, head):
    ids, want = expected
    untied = pair_models.build_family(tied["target"].parent / f"untied-{head}", "qwen2")["shared"]
    _, footprint, _ = loading.draft_footprint(untied, draft_vocab=vocab, draft_head=head)
    budget = pair_models.least_budget(untied, tied["target"], draft_vocab=vocab, draft_head=head)
    with LLMCad.from_pretrained(untied, tied["target"], draft_vocab=vocab, draft_head=head,
                                memory_budget=budget) as eng:
        assert eng.draft.lm_head.scheme == head and footprint == module_bytes(eng.draft)
        assert type(eng.draft.get_input_embeddings()) is torch.nn.Embedding
        assert eng.generate(ids, NEW_TOKENS).tokens == want
