"""Exception types. Each names the problem; the CLI prints the message on one line and exits 2."""


class LLMCadError(Exception):
    """Base of every error llmcad raises on purpose."""


class ModelLoadError(LLMCadError, ValueError):
    """A model directory or checkpoint cannot be used (missing, no weights, unsupported, mismatched)."""


class TokenizerMismatchError(ModelLoadError):
    """Draft and target tokenizers disagree (vocabulary, special tokens, embedding rows)."""


class WeightFileError(ModelLoadError):
    """A safetensors file is truncated, corrupt, or missing; the message names the file."""


class BudgetError(LLMCadError, ValueError):
    """A memory budget is unparsable or too small; the message says how much is needed."""


class PromptError(LLMCadError, ValueError):
    """A prompt is empty or longer than the model's context."""


class StreamerIOError(LLMCadError, OSError):
    """A weight read failed; the message names the file, the offset and the errno text."""


class EngineClosedError(LLMCadError, RuntimeError):
    """The engine was closed (explicitly or after a fatal fault) and cannot generate."""


class EngineBusyError(LLMCadError, RuntimeError):
    """generate() was called from inside the same engine's generation (a streamer callback on the
    generating thread): it would wait for itself forever."""


class OutputError(LLMCadError, OSError):
    """An output path (trace file, prepared model directory) cannot be written; the message says why."""
