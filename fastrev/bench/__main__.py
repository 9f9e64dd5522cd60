"""``python -m fastrev.bench`` = ``fastrev bench``."""

import sys

from .main import main

sys.exit(main())
