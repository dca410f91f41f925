"""Coverage-guided fuzzers (atheris) and their bounded runs."""
