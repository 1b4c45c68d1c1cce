"""``python -m mci_interp.cli``: the same as the ``mci`` command."""

from mci_interp.cli import main

raise SystemExit(main())
