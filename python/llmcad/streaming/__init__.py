"""Streaming the target from storage: the safetensors index and per-layer byte ranges (``weights``),
placement under a memory budget (``budget``), the C++ weight streamer (``streamer``), the
layer-streamed target (``streamed``) and the GPU upload ring (``gpu_upload``).

Must not import ``llmcad.speculative``, ``llmcad.models`` or ``llmcad.bench``.
"""
