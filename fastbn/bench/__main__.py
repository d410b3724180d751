"""``python -m fastbn.bench`` is the same as ``python -m fastbn bench``."""

import sys

from .runner import main

sys.exit(main())
