"""``python -m bench``: see bench.sweep."""

import sys

from bench.sweep import main

sys.exit(main())
