"""Run a quantized target in every mode and placement in a child process, so that a crash inside a
kernel (a segfault) fails the calling test instead of killing pytest.

``python tests/quantized_child.py NEW_TOKENS DRAFT TARGET [DRAFT TARGET ...]`` prints one JSON object:
{TARGET: {"<placement>/<mode>": {"tokens": [...], "streamed": number of streamed layers}}}, placements
"resident", "least" (the engine's smallest budget: every layer streamed: every mode, as the kernels
then run on views of the streamer's buffers) and "midpoint" (a quarter of the layers' bytes above
that: some layers resident, some streamed). Resident and midpoint run target-only and one tree mode.
"""
from __future__ import annotations

import json
import re
import sys

MODES = ("target-only", "llmcad", "tree", "chain")
PLACEMENT_MODES = {"resident": ("target-only", "llmcad"), "least": MODES, "midpoint": ("target-only", "tree")}
PROMPT = "def add(a, b):"


def least_budget(draft, target) -> int:
    """The smallest memory budget the engine accepts for this pair (read from its refusal of 1 byte)."""
    from llmcad import LLMCad
    from llmcad.errors import BudgetError

    from pair_models import LEAST_BUDGET

    try:
        LLMCad.from_pretrained(draft, target, memory_budget=1)
    except BudgetError as err:
        return int(re.search(LEAST_BUDGET, str(err)).group(1))
    raise AssertionError("a 1-byte budget was accepted")


def run(draft, target, new_tokens: int) -> dict:
    from llmcad import LLMCad
    from llmcad.streaming.weights import load_index

    index = load_index(target)
    least = least_budget(draft, target)
    layer_bytes = sum(index.layer_bytes(i) for i in range(index.num_layers))
    placements = {"resident": dict(memory_budget=None), "least": dict(memory_budget=least),
                  "midpoint": dict(memory_budget=least + layer_bytes // 4)}
    results = {}
    for placement, options in placements.items():
        for mode in PLACEMENT_MODES[placement]:
            engine = LLMCad.from_pretrained(draft, target, mode=mode, **options)
            try:
                streamed = len(engine.placement.streamed_layers) if engine.placement else 0
                results[f"{placement}/{mode}"] = {"tokens": engine.generate(PROMPT, new_tokens).tokens,
                                                  "streamed": streamed}
            finally:
                engine.close()
    return results


if __name__ == "__main__":
    from llmcad.cli import quiet_transformers

    quiet_transformers()
    new_tokens, paths = int(sys.argv[1]), sys.argv[2:]
    print(json.dumps({target: run(draft, target, new_tokens) for draft, target in zip(paths[::2], paths[1::2])}))
