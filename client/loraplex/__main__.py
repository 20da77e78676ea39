"""``python -m loraplex``: the ``loraplex`` command line."""

import sys

from loraplex.cli import main

sys.exit(main())
