"""The benchmark suite (``pytest bench --benchmark-only``); the implementation is :mod:`fastrev.bench`.

A package so that ``bench/test_bench.py`` and ``tests/test_bench.py`` can be collected in one pytest run.
"""
