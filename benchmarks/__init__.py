"""The benchmarks: each a module run from the repository root, ``python -m benchmarks.NAME``; what they
share they import from one another as ``benchmarks.NAME``."""
