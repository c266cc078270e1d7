"""`python -m labkit`: the `labkit` program (see labkit.cli)."""

import sys

from labkit.cli import main

sys.exit(main())
