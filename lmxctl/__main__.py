"""`python -m lmxctl`: the same entry as the `lmxctl` console script."""

from lmxctl.cli import main

raise SystemExit(main())
