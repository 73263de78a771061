"""The demos: each a module run from the repository root, ``python -m demos.NAME``; what they share is
``demos.common``, and ``python -m demos.readme`` renders the README's result blocks from their results."""
