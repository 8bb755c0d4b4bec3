"""The reliability suite: crashes, concurrency, hostile input, environment faults (issue #7).

A package so that its ``conftest`` does not shadow ``tests/conftest.py`` (both would otherwise be
the top-level module ``conftest``).
"""
