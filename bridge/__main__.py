"""``python -m bridge`` is the same as the ``energy-bridge`` command."""

from bridge.cli import main

raise SystemExit(main())
