"""Unit tests of the pure parts, in-process and fast."""
