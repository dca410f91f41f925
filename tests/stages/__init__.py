"""In-process tests of one pipeline stage each, against real, cheap neighbours."""
