"""Loading a draft/target pair of Hugging Face causal LMs and checking that their tokenizers agree.

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcad.errors import BudgetError, ModelLoadError, TokenizerMismatchError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.")


@dataclass
class ModelPair:
    """A loaded pair: both models in eval mode and the target's tokenizer."""

    draft: torch.nn.Module
    target: torch.nn.Module
    tokenizer: object
    placement: object = None  # llmcad.streaming.budget.Placement when a memory budget was given
    streamed: object = None  # llmcad.streaming.streamed.StreamedTarget (its model is target) with a budget
    runtime_floor: int = 0  # bytes resident before the weights loaded (llmcad.memory.runtime_floor)
    budget_source: str | None = None  # how the memory budget was found ("given", or what "auto" read)
    draft_vocab: object = None  # sorted int64 token ids of the draft's pruned output rows (None: full vocabulary)


def resolve_dtype(dtype):
    """None / "auto" (checkpoint's dtype), a torch.dtype, or a name such as "bfloat16"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        if dtype.replace("torch.", "") in _DTYPES:
            return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype={dtype!r}: expected one of float32, bfloat16, float16, auto or a torch.dtype")


def resolve_device(device) -> torch.device:
    """A torch.device; ValueError for an unknown name, ModelLoadError for CUDA without a GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r}: CUDA is not available on this machine")
    return dev


def _check_source(source) -> str:
    """A local directory must exist and hold a config. Only an ``owner/name`` string with no such path
    here is tried as a hub id; anything else that does not exist is reported at once."""
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists() and _looks_like_hub_id(text):
        return check_hub_id(text)
    if not path.is_dir():
        where = "" if path.exists() else f" (looked in {path.absolute().parent})"
        raise ModelLoadError(f"model directory {text!r} does not exist{where}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {text!r} has no config.json (expected Hugging Face layout)")
    check_config(path)
    return str(path)


def _looks_like_hub_id(text: str) -> bool:
    """``owner/name`` whose owner is not a directory here (``models/x`` with ./models present is a path)."""
    owner = text.partition("/")[0]
    return bool(_HUB_ID.fullmatch(text)) and not Path(owner).exists()


def check_sources(*sources) -> None:
    """Each source a usable local model directory or a hub id the hub can supply (ModelLoadError at
    once otherwise); nothing is loaded."""
    for source in sources:
        _check_source(source)


def check_hub_id(text: str) -> str:
    """``text`` if the hub can supply it: already in the local hub cache, or the hub reachable within a
    second. Otherwise ModelLoadError at once (transformers would retry for about a minute)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(text, "config.json"), str):
        return text
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not hub_reachable():
        raise ModelLoadError(f"{text!r} is not a local directory, and as a Hugging Face hub id it cannot be "
                             "downloaded: the hub is unreachable (offline) and the model is not in the local "
                             "cache; pass a local model directory (e.g. one `llmcad prepare` wrote)")
    return text


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def no_loading_bars():
    """transformers' "Loading weights" progress bar off for the duration (llmcad reports loading
    itself); the caller's setting is restored afterwards."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def load_causal_lm(source, *, device="cpu", dtype=None, mmap=False, trust_remote_code=False) -> torch.nn.Module:
    """A decoder-only causal LM in eval mode; ``dtype=None``: config.json's dtype, else the checkpoint's.
    ``trust_remote_code``: run Python code the model directory ships (auto_map); never without it.

    The weights are read into memory the model owns, so a checkpoint changed or truncated after
    loading changes nothing. ``mmap=True`` maps the files instead (faster, less memory at load), at a
    risk: truncating a mapped file kills the process with SIGBUS on the next forward, and editing it in
    place silently changes the outputs.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    where = _check_source(source)
    local = Path(where).is_dir()
    config = check_checkpoint(where, trust_remote_code=trust_remote_code) if local else None
    if local and _is_quantized(where):  # transformers cannot load llmcad's packed linears: build it ourselves
        from llmcad.streaming.streamed import load_streamed_target

        resident = load_streamed_target(where, dtype=resolve_dtype(dtype), device=resolve_device(device),
                                        trust_remote_code=trust_remote_code)
        resident.close()  # every layer is loaded: the weight files are no longer needed
        return resident.model
    try:
        if local and not mmap and any(Path(where).glob("*.safetensors")) \
                and type(config) in AutoModelForCausalLM._model_mapping:
            with no_loading_bars():
                model = _load_owned(where, config, resolve_dtype(dtype))
        else:
            with no_loading_bars():
                model = AutoModelForCausalLM.from_pretrained(where, dtype=resolve_dtype(dtype) or "auto",
                                                             trust_remote_code=trust_remote_code)
            if not mmap:
                _own(model)
    except ModelLoadError:
        raise
    except pickle.UnpicklingError as exc:
        raise _pickle_refused(where, exc) from None
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise _load_error(f"cannot load model {str(source)!r}", exc) from exc
    _check_decoder_layers(model, source)
    return model.to(resolve_device(device)).eval()


def _load_owned(where, config, dtype) -> torch.nn.Module:
    """from_pretrained on a state dict read tensor by tensor (peak memory: one copy of the weights)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llmcad.streaming.weights import load_index, read_tensors

    index = load_index(where)
    state = read_tensors(index, list(index.tensors))
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype or "auto")
    del state
    if (Path(where) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(where)
    return model


def _own(model) -> None:
    """Replace every parameter and buffer by a copy in memory the model owns (hub downloads, .bin)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()


def check_checkpoint(directory, *, trust_remote_code=False):
    """Fail early, with one clear line, on what transformers reports badly, late or not at all: every
    safetensors header is read (truncated file, corrupt header, overlapping tensors, missing shard ->
    WeightFileError naming the file), config.json's sizes must make sense, the architecture must have
    decoder layers in a ModuleList, every parameter the model needs must be stored (or tied to a
    stored one) with the shape config.json describes, and the weights must not hold more decoder
    layers than the config (ModelLoadError naming the tensor or field). Nothing is loaded (meta
    device). Returns the config. ``trust_remote_code``: as for :func:`load_causal_lm`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcad.models.eos import check_stored_end_ids
    from llmcad.streaming.quantized import quantize_modules, scheme_of
    from llmcad.streaming.weights import checkpoint_files, read_header

    directory = Path(directory)
    check_config(directory)
    check_stored_end_ids(directory)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError) as exc:
        raise _load_error(f"cannot load model {str(directory)!r}", exc) from exc
    if not any(directory.glob("*.safetensors")) and any(directory.glob("*.bin")):
        return config  # a legacy PyTorch checkpoint: transformers checks it
    shapes = {}
    for path in checkpoint_files(directory):
        entries, _ = read_header(path)
        shapes.update((name, (path, tuple(e["shape"]))) for name, e in entries.items())
    _check_layer_count(config, shapes, directory)  # before building: a huge count would build for minutes
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(f"cannot load model {str(directory)!r}", exc) from exc
    record = scheme_of(config)
    if record is not None:
        quantize_modules(model, record, model.dtype)
    _check_decoder_layers(model, directory)
    _check_tensors(model, shapes, directory)
    return config


def _check_layer_count(config, shapes: dict, directory) -> None:
    """config.json's num_hidden_layers must be the number of decoder layers the weights hold."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    found = [m for m in map(_LAYER_KEY.match, shapes) if m]
    if not isinstance(layers, int) or not found:
        return  # named otherwise, or no layer tensors: the tensor check below names what is missing
    stored = 1 + max(int(m[1]) for m in found)
    if stored > layers:
        raise ModelLoadError(f"{directory}: the weights hold {stored} decoder layers, config.json's "
                             f"num_hidden_layers is {layers} (config and weights disagree)")
    if stored < layers:
        prefix = found[0].group(0)[: found[0].start(1)]
        raise ModelLoadError(f"{directory}: the weights have no '{prefix}{stored}.*' tensors: config.json's "
                             f"num_hidden_layers is {layers}, the weights hold {stored} decoder layers "
                             "(incomplete checkpoint, or config and weights disagree)")


def _check_tensors(model, shapes: dict, directory) -> None:
    """Every parameter stored (or tied to a stored one) with its shape."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name not in shapes and tied.get(name) not in shapes:
            raise ModelLoadError(f"{directory}: the weights have no {name!r}, which config.json's "
                                 f"{type(model).__name__} needs (incomplete checkpoint, or config and weights "
                                 "disagree)")
    for name, param in model.state_dict().items():
        path, shape = shapes.get(name, (None, tuple(param.shape)))
        if shape != tuple(param.shape):
            raise ModelLoadError(f"{path}: {name!r} has shape {list(shape)} but config.json describes "
                                 f"{list(param.shape)} (config and weights disagree)")


_MAX_SIZE = 2**31 - 1  # sizes index tensors with int32 in many kernels: anything larger describes no model
_POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "max_position_embeddings", "head_dim")


def check_config(directory) -> None:
    """ModelLoadError naming the config.json field whose value cannot describe a model (sizes, head
    counts and context must be positive integers; heads must divide as attention needs). Checked on the
    file itself: some config classes divide by the head count as they are built."""
    import json

    source = Path(directory) / "config.json"
    try:
        raw = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: cannot read config ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{source}: not a JSON object")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    values = {}
    for name in _POSITIVE_FIELDS:
        value = text.get(name)
        if value is None:
            continue  # absent, or named otherwise by this architecture: transformers checks it
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"{source}: {name}={value!r}: expected an integer > 0")
        if value > _MAX_SIZE:
            raise ModelLoadError(f"{source}: {name}={value}: too large to describe a model (at most {_MAX_SIZE})")
        values[name] = value
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if kv_heads and heads % kv_heads:
        raise ModelLoadError(f"{source}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
    if "head_dim" not in values and heads and values.get("hidden_size", 0) % heads:
        raise ModelLoadError(f"{source}: hidden_size={values['hidden_size']} is not a multiple of "
                             f"num_attention_heads={heads}")


def _is_quantized(directory) -> bool:
    """True for a checkpoint written by ``llmcad prepare --quantize``."""
    import json

    from llmcad.models.quantize import CONFIG_KEY

    try:
        return CONFIG_KEY in json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_tokenizer(source, *, trust_remote_code=False):
    """The tokenizer of ``source``; ``trust_remote_code``: as for :func:`load_causal_lm`. The last one
    read from a local directory is returned again, the same object, while that directory's files other
    than weights are unchanged: the CLI asks for the target's several times in one run, and a large
    vocabulary's takes about a second to read."""
    global _last_tokenizer
    from transformers import AutoTokenizer

    where = _check_source(source)
    key = _tokenizer_key(where, trust_remote_code)
    if key is not None and _last_tokenizer is not None and _last_tokenizer[0] == key:
        return _last_tokenizer[1]
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(f"cannot load the tokenizer of {str(source)!r}", exc) from exc
    if key is not None:
        _last_tokenizer = (key, tokenizer)
    return tokenizer


_last_tokenizer = None  # (key, tokenizer) of the last tokenizer read from a local directory
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_DIGEST_MAX_BYTES = 64 << 20


def _tokenizer_key(where: str, trust_remote_code: bool):
    """What a tokenizer read from ``where`` depends on: the directory and the contents of each file in it
    but the weights (tokenizer files, chat templates, config.json's model_type; a digest, about 10 ms for
    a large vocabulary's); None for a hub id."""
    import hashlib

    path = Path(where)
    if not path.is_dir():
        return None

    def signature(f: Path):
        stat = f.stat()
        if stat.st_size > _DIGEST_MAX_BYTES:  # no tokenizer file is this large: weights in another format
            return f.name, stat.st_size, stat.st_mtime_ns
        return f.name, hashlib.blake2b(f.read_bytes(), digest_size=16).digest()

    try:
        files = sorted(signature(f) for f in path.iterdir() if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES))
    except OSError:
        return None
    return str(path.resolve()), bool(trust_remote_code), tuple(files)


def _check_decoder_layers(model, source) -> None:
    from llmcad.streaming.streamed import decoder_layers

    decoder_layers(model, source)


def _load_error(what: str, exc: BaseException) -> ModelLoadError:
    """ModelLoadError for a failed load; transformers' refusal to run a model's own code gets llmcad's
    words (its own advice names a Python argument and a hub page)."""
    if "trust_remote_code" in str(exc):
        return ModelLoadError(f"{what}: the model directory asks to run its own Python code (auto_map in its "
                              "config); llmcad runs no model code unless you opt in with --trust-remote-code "
                              "(trust_remote_code=True), after reading that code")
    return ModelLoadError(f"{what}: {_one_line(exc)}")


def _pickle_refused(where, exc) -> ModelLoadError:
    """A pickle checkpoint (.bin) that torch.load(weights_only=True) refused: it holds more than tensors,
    and loading it anyway could run code, which llmcad never does."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    holds = f"a {found[1]} object" if found else "objects other than tensors"
    files = ", ".join(str(p) for p in sorted(Path(where).glob("*.bin"))[:3]) if Path(where).is_dir() else str(where)
    return ModelLoadError(f"{files}: a pickle checkpoint holding {holds}, which llmcad does not load (a pickle "
                          "is read only as plain tensors, never by running its code); use a safetensors "
                          "checkpoint of this model")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def special_token_ids(tokenizer) -> dict:
    """Name -> id of every special token the tokenizer defines (bos, eos, pad, unk, extras)."""
    ids = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            ids[name] = tokenizer.convert_tokens_to_ids(token)
    for token, token_id in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        ids.setdefault(token, token_id)
    return ids


def check_tokenizers(draft_tokenizer, target_tokenizer, draft_model, target_model) -> None:
    """TokenizerMismatchError naming what differs between the two tokenizers as loaded: vocabulary,
    special tokens (each with its text and id on both sides, and where the difference comes from), or a
    draft whose vocabulary is larger than the target's embedding rows."""
    draft_vocab, target_vocab = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
    if draft_vocab != target_vocab:
        only_d = sorted(set(draft_vocab.items()) - set(target_vocab.items()))[:3]
        only_t = sorted(set(target_vocab.items()) - set(draft_vocab.items()))[:3]
        raise TokenizerMismatchError(
            f"draft and target vocabularies differ (draft has {len(draft_vocab)} tokens, target "
            f"{len(target_vocab)}; e.g. draft-only {only_d}, target-only {only_t})"
            f"{_tokenizer_origin(draft_tokenizer, target_tokenizer)}")
    draft_special, target_special = special_token_ids(draft_tokenizer), special_token_ids(target_tokenizer)
    if draft_special != target_special:
        diff = "; ".join(f"{name}: draft {_special_text(draft_tokenizer, name, draft_special)}, target "
                         f"{_special_text(target_tokenizer, name, target_special)}"
                         for name in sorted(set(draft_special) | set(target_special))
                         if draft_special.get(name) != target_special.get(name))
        raise TokenizerMismatchError(f"draft and target tokenizers define different special tokens ({diff})"
                                     f"{_tokenizer_origin(draft_tokenizer, target_tokenizer)}")
    draft_rows = output_rows(draft_model)
    target_rows = target_model.get_input_embeddings().weight.shape[0]
    if draft_rows > target_rows:
        raise TokenizerMismatchError(
            f"draft vocabulary ({draft_rows} logits) is larger than the target's embedding rows ({target_rows})")
    draft_inputs = draft_model.get_input_embeddings().weight.shape[0]
    target_logits = output_rows(target_model)
    if draft_inputs < target_logits:
        raise TokenizerMismatchError(
            f"draft vocabulary ({draft_inputs} embedding rows) does not cover the target's token ids "
            f"(0..{target_logits - 1}): every token the target emits is fed to the draft next")


def _special_text(tokenizer, name: str, ids: dict) -> str:
    """``'</s>' (id 2)`` for special token ``name`` (bos_token... or the token text), ``none`` if undefined."""
    if name not in ids:
        return "none"
    text = getattr(tokenizer, name, None) if name.endswith("_token") else name
    return f"{str(text)!r} (id {ids[name]})"


def _tokenizer_origin(draft_tokenizer, target_tokenizer) -> str:
    """Where the tokenizers come from: their classes, and whether their files are byte-identical (then
    the difference is the class transformers picked from each config.json's model_type)."""
    classes = f"draft {type(draft_tokenizer).__name__}, target {type(target_tokenizer).__name__}"
    dirs = [Path(str(getattr(t, "name_or_path", ""))) for t in (draft_tokenizer, target_tokenizer)]
    if not all(d.is_dir() for d in dirs):
        return f" ({classes})"
    pairs = [(dirs[0] / name, dirs[1] / name) for name in _TOKENIZER_FILES]
    same = all(a.is_file() == b.is_file() and (not a.is_file() or a.read_bytes() == b.read_bytes()) for a, b in pairs)
    if not same:
        return f" ({classes}; their tokenizer files differ)"
    return (f"; the tokenizer files are byte-identical: the difference comes from the tokenizer classes transformers "
            f"picks from each config.json's model_type ({classes}), which add their own default special tokens")


def load_pair(draft, target, *, device="cpu", dtype=None, memory_budget=None, streamer_options=None,
              mmap=False, trust_remote_code=False, draft_vocab=None, draft_head="auto") -> ModelPair:
    """Load both models and the target's tokenizer; fail early when the tokenizers disagree.
    ``memory_budget``: None (the target resident, nothing bounded), a size or "auto"
    (llmcad.streaming.budget.resolve_budget); a budget below the runtime floor plus the least plan is
    refused before any weight loads.
    ``streamer_options``: WeightStreamer keyword arguments for a streamed target (with a budget).
    ``mmap``: map the draft's and a resident target's files instead of reading them (see load_causal_lm).
    ``trust_remote_code``: run Python code a model directory ships; never without it (default False).
    ``draft_vocab``: N keeps only the draft's N most frequent output rows (llmcad.models.vocab); None: all.
    ``draft_head``: how the draft's output layer is held, "auto", "float", "int8" or "int4"
    (llmcad.models.draft_head; packed after any pruning)."""
    from llmcad.memory import malloc_trim, return_large_frees, runtime_floor

    trust = {"trust_remote_code": bool(trust_remote_code)}
    target_tokenizer = load_tokenizer(target, **trust)
    same = str(draft) == str(target) or _same_tokenizer_files(draft, target)
    draft_tokenizer = target_tokenizer if same else load_tokenizer(draft, **trust)  # a large vocabulary's costs 100 MB
    source = None
    if memory_budget is not None:
        from llmcad.streaming.budget import resolve_budget

        memory_budget, source = resolve_budget(memory_budget)
    _import_model_classes(draft, target, **trust)  # part of the runtime, not of the weights
    floor = runtime_floor()
    if memory_budget is not None:
        return_large_frees()  # freed pass intermediates leave the resident set (the budget is a bound)
        _check_budget_before_loading(draft, target, memory_budget=memory_budget, device=device, dtype=dtype,
                                     runtime_floor=floor, streamer_options=streamer_options, draft_vocab=draft_vocab,
                                     draft_head=draft_head, **trust)
    draft_model = load_causal_lm(draft, device=device, dtype=dtype, mmap=mmap, **trust)
    vocab_ids = prune_draft_vocab(draft_model, draft_tokenizer, draft_vocab, target)
    pack_draft_head(draft_model, draft_head)
    malloc_trim()  # loading frees its read buffers; give their pages back before the plan counts on them
    extra = {"streamer_options": streamer_options} if streamer_options else {}
    target_model, streamed = _load_target(target, device=device, dtype=dtype, memory_budget=memory_budget,
                                          draft_model=draft_model, mmap=mmap, **extra, **trust)
    malloc_trim()
    check_tokenizers(draft_tokenizer, target_tokenizer, draft_model, target_model)
    placement = streamed.placement if streamed is not None else None
    return ModelPair(draft_model, target_model, target_tokenizer, placement, streamed, floor, source, vocab_ids)


def pack_draft_head(draft_model, draft_head) -> str:
    """The draft's output layer packed as ``draft_head`` asks (llmcad.models.draft_head); returns its scheme."""
    from llmcad.models.draft_head import pack_output_layer
    from llmcad.streaming.quantized import scheme_of

    record = scheme_of(draft_model.config)
    return pack_output_layer(draft_model, draft_head, record["scheme"] if record else None)


def output_rows(model) -> int:
    """Rows (logits) of a model's output layer, float or packed."""
    head = model.get_output_embeddings()
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]


def prune_draft_vocab(draft_model, tokenizer, draft_vocab, target):
    """The draft's output layer cut to ``draft_vocab`` rows (llmcad.models.vocab); returns their token
    ids, or None when nothing is cut (None, or at least as many rows as the layer has)."""
    from llmcad.models.vocab import prune_output_layer

    ids = draft_vocab_ids(draft_model, tokenizer, draft_vocab, target)
    if ids is not None:
        prune_output_layer(draft_model, ids)
    return ids


def draft_vocab_ids(draft_model, tokenizer, draft_vocab, target):
    """The sorted token ids a draft cut to ``draft_vocab`` rows keeps (None: nothing to cut): the ranked
    tokens, its tokenizer's special tokens and both models' end-of-generation ids."""
    from llmcad.models.eos import end_of_generation_ids, stored_end_ids
    from llmcad.models.vocab import kept_ids, parse_draft_vocab

    n = parse_draft_vocab(draft_vocab)
    rows = output_rows(draft_model)
    if n is None or n >= rows:
        return None
    ends = end_of_generation_ids(draft_model, tokenizer)
    ends += stored_end_ids(target) if Path(str(target)).is_dir() else []
    return kept_ids(tokenizer, n, rows, always=ends)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tokenizer.model")  # not the chat template: only the target's is used


def _same_tokenizer_files(draft, target) -> bool:
    """Whether two local model directories hold byte-identical tokenizer files (the same tokenizer)."""
    a, b = Path(str(draft)), Path(str(target))
    if not (a.is_dir() and b.is_dir()) or not (a / "tokenizer.json").is_file():
        return False
    for name in _TOKENIZER_FILES:
        fa, fb = a / name, b / name
        if fa.is_file() != fb.is_file() or (fa.is_file() and fa.read_bytes() != fb.read_bytes()):
            return False
    return True


def _import_model_classes(*sources, trust_remote_code=False) -> None:
    """Import the modeling code of each local source's architecture, so that the runtime floor holds it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for source in sources:
        if Path(str(source)).is_dir():
            try:
                config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
                AutoModelForCausalLM._model_mapping[type(config)]
            except (KeyError, OSError, ValueError, TypeError, ZeroDivisionError):
                pass  # load_causal_lm reports it


def draft_footprint(draft, dtype=None, *, trust_remote_code=False, draft_vocab=None, draft_head="auto",
                    device="cpu") -> tuple:
    """(config, bytes, dtype) of draft directory ``draft`` as it will be loaded in ``dtype`` (None: the
    checkpoint's), packed linears as stored, output layer cut to ``draft_vocab`` rows (None: all) and
    held as ``draft_head`` decides on ``device``, from its config and weight files alone: the shapes, no
    weight read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcad.models import draft_head as heads
    from llmcad.models.vocab import parse_draft_vocab, pruned_head_bytes
    from llmcad.streaming.quantized import quantize_modules, scheme_of
    from llmcad.streaming.streamed import checkpoint_dtype
    from llmcad.streaming.weights import load_index

    draft_dtype = resolve_dtype(dtype) or checkpoint_dtype(load_index(draft))
    config = AutoConfig.from_pretrained(draft, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes only: the bytes module_bytes will count once it is loaded
        meta = AutoModelForCausalLM.from_config(config, dtype=draft_dtype)
    record = scheme_of(config)
    if record is not None:  # a packed draft holds its linears as stored (int8 / int4 codes, scales, zeros)
        quantize_modules(meta, record, draft_dtype)
    total = sum(t.numel() * t.element_size() for t in list(meta.parameters()) + list(meta.buffers()))
    head = meta.get_output_embeddings()
    rows, cols = head.weight.shape
    n = parse_draft_vocab(draft_vocab)
    if n is not None and n < rows:
        total += pruned_head_bytes(meta.config, n, draft_dtype)
        rows = n
    scheme, group = heads.resolve(draft_head, record["scheme"] if record else None, (rows, cols), device)
    if scheme is not None:  # the packed head replaces the float one (a tied one: the embeddings too)
        text = meta.config.get_text_config() if hasattr(meta.config, "get_text_config") else meta.config
        tied = getattr(text, "tie_word_embeddings", False) and rows == head.weight.shape[0] and head.bias is None
        copies = 2 if tied and scheme == "int4" else 1  # int8 embeddings share the head's codes
        total += copies * heads.packed_bytes(rows, cols, scheme, group, draft_dtype) \
            - rows * cols * head.weight.element_size()
    return config, total, draft_dtype


def _check_budget_before_loading(draft, target, *, memory_budget, device, dtype, runtime_floor, streamer_options,
                                 draft_vocab=None, draft_head="auto", trust_remote_code=False):
    """Plan the budget with the draft's bytes taken from its weight files (no weight read): BudgetError,
    naming the runtime floor and the least plan, before anything loads."""
    from llmcad.streaming.streamed import plan_budget

    if not (Path(str(draft)).is_dir() and Path(str(target)).is_dir()):
        return  # a hub id: the plan after the draft loads is the check
    for source in (draft, target):  # a bad model is named as without a budget, before any plan of it
        check_checkpoint(_check_source(source), trust_remote_code=trust_remote_code)
    try:
        config, draft_bytes, draft_dtype = draft_footprint(draft, dtype, trust_remote_code=trust_remote_code,
                                                           draft_vocab=draft_vocab, draft_head=draft_head,
                                                           device=resolve_device(device))
    except (OSError, ValueError, KeyError):
        return  # load_causal_lm reports it
    try:
        plan_budget(_check_source(target), memory_budget=memory_budget, draft_config=config,
                    draft_bytes=draft_bytes, draft_dtype=draft_dtype, dtype=resolve_dtype(dtype),
                    device=resolve_device(device), streamer_options=streamer_options, runtime_floor=runtime_floor,
                    trust_remote_code=trust_remote_code)
    except BudgetError:
        raise
    except (ValueError, KeyError, AttributeError, TypeError, ZeroDivisionError, OSError):
        return  # a model the loader refuses: it names the problem as it does without a budget


def _load_target(target, *, device, dtype, memory_budget, draft_model, mmap=False, streamer_options=None,
                 trust_remote_code=False):
    """The target model the engine verifies with, and its StreamedTarget (None without a budget).

    The one place a memory budget changes how the target is built: with ``memory_budget=None`` the
    target is resident; with a budget, llmcad.streaming.streamed plans which layers fit beside the draft and
    returns the streamed target (the same HF model, layers bound to streamed weights).
    """
    if memory_budget is None:
        return load_causal_lm(target, device=device, dtype=dtype, mmap=mmap, trust_remote_code=trust_remote_code), None
    from llmcad.streaming.streamed import load_budgeted_target  # lazy: streaming machinery only with a budget

    where = _check_source(target)
    check_checkpoint(where, trust_remote_code=trust_remote_code)  # the same early, one-line errors as resident
    streamed = load_budgeted_target(where, memory_budget=memory_budget, draft_model=draft_model,
                                    dtype=resolve_dtype(dtype), device=resolve_device(device),
                                    streamer_options=streamer_options, trust_remote_code=trust_remote_code)
    return streamed.model, streamed
