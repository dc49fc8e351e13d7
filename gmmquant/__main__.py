"""`python -m gmmquant ...` runs the command line (the same as the `gmmquant` script)."""

import sys

from .cli import main

sys.exit(main())
