"""The pytest-benchmark suite (``pytest bench --benchmark-only``); the harness is the :mod:`fastrev.bench` package.

A package so that ``bench/test_bench.py`` and ``tests/test_bench.py`` can be collected in one pytest run.
"""
