"""``python -m volagent`` is the ``volagent`` command."""

from volagent.cli import main

raise SystemExit(main())
