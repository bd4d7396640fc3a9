"""Speculative decoding: the token tree and its plan (``tree``), the draft's tree growth (``draft``),
when to verify (``policy``), acceptance (``verify``), masked forwards (``forward``), the KV commit
(``kv``) and the compute-IO pipeline (``pipeline``).

Works on any HF causal LM handed to it. Must not import ``llmcad.streaming``, ``llmcad.models`` or
``llmcad.bench``: a streamed target reaches it only through the object the engine passes in.
"""
