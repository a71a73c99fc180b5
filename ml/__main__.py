"""``python -m ml``: run one stage by hand (see ``python -m ml --help``)."""

from ml.cli import main

raise SystemExit(main())
