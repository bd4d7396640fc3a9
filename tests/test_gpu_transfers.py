"""Device-to-host transfers per round, counted and held to a budget.

A round may bring back, and so wait for the device, only what the host must decide on: the draft's
top tokens and their probabilities (two small copies per expanded draft row), and one copy of the
acceptance walk's ids per verification. Validation, planning, the KV commit and the target's choice
stay on the device.
On the CPU the spy counts calls on the tensors a GPU run would keep on the device (see
transfer_spy); with a GPU it counts calls on CUDA tensors (cuda marker).
"""
from __future__ import annotations

import pytest
import torch

import llmcad
from llmcad import LLMCad
from llmcad.speculative.policy import make_policy
from transfer_spy import TransferSpy

PROMPT = "def add(a, b):"
NEW_TOKENS = 12
DRAFT_COPIES = 2  # per draft row (node run): top-k probabilities and tokens (llmcad.speculative.draft)
ACCEPT_COPIES = 1  # per verification: the accept record
SMALL_COPY = 16  # elements: a draft row's top-k (the tiny models' vocabularies are far larger)


def _run_counted(draft, target, tokenizer, mode, device, monkeypatch, **generate):
    """Generate under the spy; returns (result, spy, draft rows run)."""
    from llmcad.speculative import draft as draft_module

    engine = LLMCad(draft, target, tokenizer, make_policy(mode))
    engine.generate(PROMPT, 2, **generate)  # warm-up: lazy initialisations are not a round's
    rows = []
    forward = draft_module.forward_with_mask

    def counting_forward(*args, **kwargs):
        logits = forward(*args, **kwargs)
        rows.append(logits.shape[0])
        return logits

    monkeypatch.setattr(draft_module, "forward_with_mask", counting_forward)
    with TransferSpy(device, sources=(draft, target)) as spy:
        result = engine.generate(PROMPT, NEW_TOKENS, **generate)
    return result, spy, sum(rows)


def _check_budget(spy, stats, draft_rows) -> None:
    draft_side = {k: n for k, n in spy.calls.items() if "speculative/draft.py" in k[1]}
    target_side = {k: n for k, n in spy.calls.items() if k not in draft_side}
    assert sum(target_side.values()) <= ACCEPT_COPIES * stats["target_passes"], _describe(spy)
    assert sum(draft_side.values()) <= DRAFT_COPIES * draft_rows, _describe(spy)
    assert all(spy.largest[k] <= SMALL_COPY for k in draft_side), _describe(spy)  # top-k, never a full row


def _describe(spy) -> str:
    return "\n".join(f"{n} x {name} at {where} (up to {spy.largest[name, where]} elements)"
                     for (name, where), n in spy.calls.most_common())


@pytest.mark.parametrize("mode", ["target-only", "chain", "tree", "llmcad"])
@pytest.mark.parametrize("sampled", [False, True])
def test_round_transfers_within_budget_on_cpu(tiny_models, tiny_tokenizer, mode, sampled, monkeypatch):
    from llmcad.speculative import verify

    draft, target = tiny_models("qwen2", "same"), tiny_models("qwen2", "target")
    options = {"do_sample": True, "seed": 3, "temperature": 0.8} if sampled else {}
    # a GPU run chooses every row at once, on the device (the lazy walk is for host logits): emulate it
    monkeypatch.setattr(verify, "_head_on_host", lambda logits: False)
    result, spy, draft_rows = _run_counted(draft, target, tiny_tokenizer, mode, "cpu", monkeypatch, **options)
    stats = result.stats
    assert stats["target_passes"] >= 2
    _check_budget(spy, stats, draft_rows)
    names = {name for name, _ in spy.calls}
    assert names <= {"tolist", "cpu"}, _describe(spy)
    # every verification's walk came back in exactly one copy
    accept = sum(n for (name, where), n in spy.calls.items() if "verify.py" in where or "tree.py" in where)
    assert accept == stats["target_passes"], _describe(spy)


def test_spy_sees_every_kind_of_transfer(tiny_models):
    """The spy itself: each transfer form on a device tensor is counted, host tensors are not."""
    target = tiny_models("qwen2", "target")
    forms = {"__int__": lambda x: int(x[0] > 0), "__float__": lambda x: float(x[1]), "tolist": lambda x: x.tolist(),
             "cpu": lambda x: x.cpu(), "numpy": lambda x: x.numpy(), "item": lambda x: x[0].item(),
             "equal": lambda x: torch.equal(x, x), "__bool__": lambda x: bool(x[0])}
    with torch.no_grad(), TransferSpy("cpu", sources=(target,)) as spy:
        host = torch.arange(3)
        int(host[0]), host.tolist(), host.cpu()  # host data: free
        assert spy.count == 0
        for form in forms.values():
            form(target.get_input_embeddings().weight[0, :3] * 2)  # computed from a parameter: "device"
    assert sorted(name for name, _ in spy.calls) == sorted(forms)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and llmcad.build_info()["cuda_available"]),
                    reason="needs a CUDA build and a GPU")
@pytest.mark.parametrize("mode", ["chain", "tree", "llmcad"])
def test_round_transfers_within_budget_on_gpu(tiny_pair_dirs, tiny_tokenizer, mode, monkeypatch):
    from llmcad.models.loading import load_causal_lm

    dirs = tiny_pair_dirs("qwen2")
    draft, target = (load_causal_lm(dirs[k], device="cuda") for k in ("same", "target"))
    result, spy, draft_rows = _run_counted(draft, target, tiny_tokenizer, mode, "cuda", monkeypatch)
    _check_budget(spy, result.stats, draft_rows)


def test_kv_commit_decides_on_the_host():
    """Gather, crop and clear of a cache computed from 'device' tensors: no transfer at all, and the
    slots kept are the ones asked for; bad host indices are refused before any device work."""
    from transformers import DynamicCache

    from llmcad.speculative import kv

    source = torch.nn.Linear(4, 4)
    with torch.no_grad(), TransferSpy("cpu", sources=(source,)) as spy:
        cache = DynamicCache()
        for layer in range(2):
            keys = (source.weight[0, 0] * 0 + torch.arange(10.0) + layer).view(1, 1, 10, 1).repeat(1, 2, 1, 4)
            cache.update(keys, -keys, layer)
        kv.commit(cache, [0, 1, 2, 5, 7])
        device_keep = (source.weight[0, :3] * 0).long() + torch.tensor([0, 1, 3])  # indices on the "device"
        kv.commit(cache, [0, 1, 3], device_keep=device_keep)
        kv.commit(cache, [0, 1])
        assert spy.count == 0, _describe(spy)
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [1.0, 2.0]
    for bad in ([1, 0], [0, 2], [-1]):
        with pytest.raises(ValueError, match="commit slots"):
            kv.commit(cache, bad)
    with pytest.raises(ValueError, match="device_keep"):
        kv.commit(cache, [0], device_keep=torch.tensor([0, 1]))
    kv.commit(cache, [])
    assert kv.cache_length(cache) == 0
