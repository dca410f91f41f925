"""The spool: the SQLite store (every SQL statement lives in ``store``), the thread that owns
it (``thread``), and the ``dlq`` command that looks at its dead letters."""
