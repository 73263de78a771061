"""The scripts that made the shipped models, SAEs and recorded results: each a module run from the
repository root, ``python -m scripts.NAME``."""
