"""The benchmark harness: raw pipeline vs the served path, concurrency, uploads, encoding, memory.

Run it with ``python -m bench`` (see ``bench/README.md``).
"""
