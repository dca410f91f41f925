"""The test suite (see ``tests/conftest.py`` for the shared fixtures)."""
