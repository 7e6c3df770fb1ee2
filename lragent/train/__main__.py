"""``python -m lragent.train``: the same as ``lragent train``."""

import sys

from lragent.train.cli import main

sys.exit(main())
