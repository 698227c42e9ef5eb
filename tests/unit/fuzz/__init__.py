"""The pieces of ``tests/unit/test_fuzz_generate.py``: cases, strategies, oracle, stack."""
