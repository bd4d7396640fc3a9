"""``llmcad serve``: an OpenAI-compatible HTTP server around one engine (``pip install "llmcad[serve]"``).

Modules: ``schemas`` (request bodies and their checks), ``errors`` (OpenAI-style error bodies),
``textstream`` (token chunks -> text deltas with stop strings), ``worker`` (the one generation thread
and its bounded FIFO queue), ``responses`` (OpenAI response and chunk objects), ``app`` (the routes),
``server`` (uvicorn, clean shutdown) and ``command`` (the CLI subcommand). Nothing in the core
imports this package.
"""
