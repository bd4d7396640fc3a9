"""llmcad: run a large language model on a device whose memory cannot hold it.

A small draft model stays in memory and grows a token tree; the large target model is streamed from
storage layer by layer and verifies the whole tree in one pass. Output is lossless.
"""
from llmcad._build import __version__, build_info
from llmcad.errors import (BudgetError, EngineBusyError, EngineClosedError, LLMCadError, ModelLoadError, OutputError,
                           PromptError, StreamerIOError, TokenizerMismatchError, WeightFileError)

__all__ = ["__version__", "build_info", "LLMCad", "LLMCadError", "ModelLoadError", "TokenizerMismatchError",
           "WeightFileError", "BudgetError", "PromptError", "StreamerIOError", "EngineClosedError", "EngineBusyError",
           "OutputError"]


def __getattr__(name):
    # The engine imports torch and transformers; load it only when asked for.
    if name == "LLMCad":
        from llmcad.engine import LLMCad

        return LLMCad
    raise AttributeError(f"module 'llmcad' has no attribute {name!r}")
