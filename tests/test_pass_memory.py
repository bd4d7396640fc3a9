"""What a pass holds at once: logits are made a chunk of rows at a time (never a whole tree's), a
prompt longer than the budget's largest pass is cached in passes of at most that many rows, the
tree is capped by it, and greedy output stays the target's own."""
from __future__ import annotations

import re

import pytest
import torch

import pair_models
from llmcad.engine import LLMCad
from llmcad.errors import BudgetError
from llmcad.speculative.policy import make_policy
from llmcad.speculative.verify import TargetChooser, TargetVerifier

LONG = 200  # prompt tokens: several passes of PASS_ROWS


def _reference(target, ids, n):
    with torch.no_grad():
        out = target.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


class _RowSpy:
    """Largest number of rows a module was called with."""

    def __init__(self, module, rows_of):
        self.largest, self.calls = 0, 0
        self._handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)
        self._rows_of = rows_of

    def _pre(self, module, args, kwargs):
        self.calls += 1
        self.largest = max(self.largest, self._rows_of(args, kwargs))

    def remove(self):
        self._handle.remove()


def _hidden_rows(args, kwargs):
    x = args[0] if args else kwargs["input"]
    return x.reshape(-1, x.shape[-1]).shape[0]


def _ids_rows(args, kwargs):
    return kwargs["input_ids"].shape[-1]


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_verification_makes_logits_a_chunk_of_rows_at_a_time(tiny_models, tiny_tokenizer, family):
    target = tiny_models(family, "target")
    ids = tiny_tokenizer(pair_models._CORPUS[3])["input_ids"]
    tokens, parents = [ids[-1]] + list(range(10, 40)), [-1] + list(range(30))  # a 31-node chain
    spy = _RowSpy(target.lm_head, _hidden_rows)
    try:
        logits = TargetVerifier(target, ids, chunk_rows=4).run(tokens, parents)
        picks = TargetChooser().choose(logits)
    finally:
        spy.remove()
    assert spy.largest <= 4 and spy.calls == 8  # 31 rows in chunks of 4
    with torch.no_grad():
        whole = target(torch.tensor([ids[:-1] + tokens])).logits[0, -len(tokens):]
    assert torch.allclose(logits.full(), whole, atol=1e-5)
    assert picks.tolist() == whole.argmax(-1).tolist()


def test_a_long_prompt_is_cached_in_passes_of_the_largest_pass(tiny_models, tiny_tokenizer):
    target = tiny_models("llama", "target")
    ids = (tiny_tokenizer(" ".join(pair_models._CORPUS))["input_ids"] * 4)[:LONG]
    spy = _RowSpy(target.model, _ids_rows)
    try:
        engine = LLMCad(tiny_models("llama", "same"), target, tiny_tokenizer, make_policy("tree", max_tree_tokens=64))
        engine.pass_rows = 48
        engine.policy.memory_cap = 48
        result = engine.generate(ids, 12)
    finally:
        spy.remove()
    assert spy.largest <= 48  # draft (same weights, same model class) and target passes alike
    assert result.tokens == _reference(target, ids, 12)


def test_the_budget_caps_the_tree_and_reports_the_floor(tiny_pair_dirs, tiny_tokenizer):
    dirs = tiny_pair_dirs("qwen2")
    with pytest.raises(BudgetError) as err:
        LLMCad.from_pretrained(dirs["same"], dirs["target"], mode="tree", max_tree_tokens=512, memory_budget=1)
    message = str(err.value)
    assert "runtime floor measured at start-up" in message and "the least plan" in message
    least = int(re.search(r"needs at least [^(]*\((\d+) bytes\)", message).group(1))
    with LLMCad.from_pretrained(dirs["same"], dirs["target"], mode="tree", max_tree_tokens=512,
                                memory_budget=least) as engine:
        assert engine.pass_rows == 16 and engine.policy.max_tree_tokens == 16
        stats = engine.generate(pair_models._CORPUS[0], 8).stats
    assert stats["runtime_floor_bytes"] > 50 * 2**20 and stats["memory_budget_bytes"] == least
    assert stats["pass_rows"] == 16 and stats["max_tree_tokens"] == 16
