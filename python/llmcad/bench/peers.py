"""The peers a user would pick instead of llmcad: transformers + accelerate disk offload.

``HFOffloadPeer`` loads the target with ``device_map="auto"``, ``max_memory`` set to the memory
budget and an ``offload_folder``: the layers that do not fit stay on disk and accelerate reads them
for every forward (transformers 5 reads offloaded weights straight from the checkpoint's safetensors
files; the folder holds whatever it must convert). With ``draft`` it is transformers' assisted
generation (``assistant_model=draft``), the peer's speculative decoding. The budget counts what
llmcad's counts: the process's runtime floor with its slack, the draft (held in memory) and KV caches
of ``kv_tokens`` positions per model, so the target's ``max_memory`` is ``budget - runtime - draft
weights - KV caches``.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from llmcad import memory
from llmcad.streaming.budget import PASS_ROWS, RUNTIME_SLACK, module_bytes, parse_size, pass_work_bytes
from llmcad.errors import BudgetError, ModelLoadError
from llmcad.models.loading import load_causal_lm, resolve_dtype
from llmcad.memory import peak_rss_bytes


def io_read_bytes() -> int | None:
    """Bytes this process has read from storage (``read_bytes`` of /proc/self/io), None where absent."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class HFOffloadPeer:
    """Greedy generation with an accelerate disk-offloaded target (and optionally a draft assistant)."""

    def __init__(self, target, *, memory_budget, offload_folder, draft=None, dtype=None, device="cpu",
                 kv_tokens: int = 2048):
        from transformers import AutoConfig, AutoModelForCausalLM

        budget = parse_size(memory_budget)
        floor = memory.runtime_floor()  # before any weight loads, as the engine measures it
        self.draft = load_causal_lm(draft, device=device, dtype=dtype) if draft is not None else None
        draft_bytes = module_bytes(self.draft) if self.draft is not None else 0
        # the same reservation llmcad's budget makes: KV caches of kv_tokens positions per model
        config = AutoConfig.from_pretrained(target, trust_remote_code=False)
        kv_bytes = _kv_bytes(config, kv_tokens, dtype)
        if self.draft is not None:
            kv_bytes += _kv_bytes(self.draft.config, kv_tokens, self.draft.dtype)
        # as llmcad's plan counts the process itself and the working set of its least pass
        runtime = floor + RUNTIME_SLACK + pass_work_bytes(
            config, self.draft.config if self.draft is not None else config, PASS_ROWS[-1],
            min(kv_tokens, getattr(config, "max_position_embeddings", None) or kv_tokens),
            resolve_dtype(dtype) or torch.float32, self.draft.dtype if self.draft is not None else torch.float32)
        target_bytes = budget - runtime - draft_bytes - kv_bytes
        if target_bytes <= 0:
            raise BudgetError(f"memory_budget={memory_budget!r} leaves nothing for the target after the runtime's "
                              f"{runtime} bytes, the draft's {draft_bytes} bytes and {kv_bytes} bytes of KV caches")
        self.offload_folder = Path(offload_folder)
        self.offload_folder.mkdir(parents=True, exist_ok=True)
        self.target_dir = Path(target)
        max_memory = {"cpu": target_bytes} if torch.device(device).type == "cpu" else {0: target_bytes, "cpu": 0}
        try:
            self.target = AutoModelForCausalLM.from_pretrained(
                target, dtype=resolve_dtype(dtype) or "auto", device_map="auto", max_memory=max_memory,
                offload_folder=str(self.offload_folder), trust_remote_code=False).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {target} with disk offload: {' '.join(str(exc).split())}") from exc
        if set(getattr(self.target, "hf_device_map", {"": "cpu"}).values()) == {"disk"}:
            # accelerate cannot run a model offloaded whole (its top module's inputs stay on meta)
            raise BudgetError(f"memory_budget={memory_budget!r} leaves {target_bytes} bytes for the target after the "
                              f"runtime's {runtime}, the draft's {draft_bytes} and {kv_bytes} of KV caches: accelerate "
                              "offloads the whole model to disk and cannot run it")
        self.budget_bytes, self.target_budget_bytes, self.kv_bytes = budget, target_bytes, kv_bytes
        self.passes = 0
        self.draft_steps = 0
        self.target.register_forward_hook(self._count_pass)
        if self.draft is not None:
            self.draft.register_forward_hook(self._count_draft)

    def _count_pass(self, *_):
        self.passes += 1

    def _count_draft(self, *_):
        self.draft_steps += 1

    def placement(self) -> dict:
        """Modules per device in accelerate's map, e.g. {"cpu": 5, "disk": 24}, and the byte budgets."""
        counts: dict = {}
        for where in getattr(self.target, "hf_device_map", {"": "cpu"}).values():  # no map: it all fit
            counts[str(where)] = counts.get(str(where), 0) + 1
        return {"device_map": counts, "budget_bytes": self.budget_bytes, "target_max_memory": self.target_budget_bytes,
                "kv_reserved_bytes": self.kv_bytes}

    def files_read(self) -> list:
        """Files the offloaded weights are read from: the target's safetensors and the offload folder."""
        return sorted(self.target_dir.glob("*.safetensors")) + [self.offload_folder]

    @torch.inference_mode()
    def generate(self, ids: list, max_new_tokens: int) -> tuple[list, dict]:
        """Greedy continuation of token ids ``ids``: (generated ids, stats like llmcad's)."""
        device = self.target.device if self.target.device.type != "meta" else torch.device("cpu")
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(input_ids))
        if self.draft is not None:
            kwargs["assistant_model"] = self.draft
        if self.target.generation_config.pad_token_id is None:
            kwargs["pad_token_id"] = self.target.generation_config.eos_token_id
        passes, steps, io0 = self.passes, self.draft_steps, io_read_bytes()
        first = _FirstEmission()
        start = first.start = time.perf_counter()
        out = self.target.generate(input_ids, streamer=first, **kwargs)
        seconds = time.perf_counter() - start
        tokens = [int(t) for t in out[0, len(ids):]]
        io1 = io_read_bytes()
        passes = self.passes - passes
        return tokens, {
            "generated_tokens": len(tokens),
            "target_passes": passes,
            "tokens_per_pass": len(tokens) / passes if passes else 0.0,
            "tokens_per_s": len(tokens) / seconds if seconds > 0 else 0.0,
            "bytes_read": (io1 - io0) if io0 is not None and io1 is not None else None,
            "peak_rss_bytes": peak_rss_bytes(),
            "draft_steps": self.draft_steps - steps,
            "time_s": {"total": seconds},
            "first_pass_s": first.seconds, "first_pass_tokens": first.tokens,
            "accept_lengths": first.accepted,  # tokens each target pass emitted
        }


class _FirstEmission:
    """A transformers streamer that notes when the first generated tokens arrive, how many there are, and
    how many each later ``put`` (one per target pass) brings (the first ``put`` is the prompt)."""

    def __init__(self):
        self.start, self.seconds, self.tokens, self._puts = 0.0, None, None, 0
        self.accepted: list = []

    def put(self, value) -> None:
        self._puts += 1
        if self._puts >= 2:
            self.accepted.append(int(value.numel()))
        if self._puts == 2:
            self.seconds, self.tokens = time.perf_counter() - self.start, int(value.numel())

    def end(self) -> None:
        pass


def _kv_bytes(config, kv_tokens: int, dtype) -> int:
    import torch

    from llmcad.streaming.budget import kv_cache_bytes

    context = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                      "max_position_embeddings", None) or kv_tokens
    dtype = resolve_dtype(dtype) or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return kv_cache_bytes(config, min(kv_tokens, context), dtype)
