"""``python -m bundlesync`` runs the command line."""

import sys

from bundlesync.cli import main

sys.exit(main())
