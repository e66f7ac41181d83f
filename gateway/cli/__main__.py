"""``python -m gateway.cli``: what the fleet and gunicorn.conf.py run (no console script needed)."""

import sys

from . import main

sys.exit(main())
