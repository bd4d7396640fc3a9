"""``llmcad serve``: an OpenAI-compatible HTTP server around one engine (``pip install "llmcad[serve]"``).

Modules: ``schemas`` (request bodies and their checks), ``errors`` (OpenAI-style error bodies),
``limits`` (what the server accepts: key, body size, Host names, read deadline, connections),
``access`` (the Host and API key checks), ``body`` (reading a JSON body within the limit),
``protocol`` (HTTP/1.1 with a read deadline and a connection cap), ``prompts`` (token ids and the
length checks), ``textstream`` (token chunks -> text deltas with stop strings), ``worker`` (the one
generation thread and its bounded FIFO queue), ``responses`` (OpenAI response and chunk objects),
``app`` (the routes), ``server`` (uvicorn, clean shutdown on signals) and ``command`` (the CLI
subcommand). Nothing in the core imports this package.
"""
