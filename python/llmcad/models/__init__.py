"""Models on disk: loading draft and target with their tokenizers (``loading``), importing GGUF or
other checkpoints into streamable safetensors (``prepare``), and fetching the demo pair (``fetch``).

May use ``llmcad.streaming`` to build a streamed target; must not import ``llmcad.speculative`` or
``llmcad.bench``.
"""
