"""Benchmarks: each module is ``selfalign bench <name>`` and writes a JSON result (see README)."""
