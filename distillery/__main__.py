"""``python -m distillery``: the same command line as the ``distillery`` script."""

import sys

from distillery.cli import main

sys.exit(main())
