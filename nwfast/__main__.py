"""``python -m nwfast``: the same command line as the ``nwfast`` script."""

import sys

from nwfast.cli import main

sys.exit(main())
