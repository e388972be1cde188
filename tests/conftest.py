"""The tests' settings (8 CPU devices) are in the repository's root conftest.py, shared with the
docstring examples."""
