"""``python -m sidecar`` is ``vsm-sidecar``."""

import sys

from .cli import main

sys.exit(main())
