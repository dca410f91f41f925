"""The spool: the SQLite store, the thread that owns it, and the ``dlq`` command.

Every SQL statement lives in ``store``; ``thread`` owns the store on the service's side; ``dlq``
looks at the dead letters.
"""
