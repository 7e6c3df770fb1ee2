"""`python -m lragent.server --model ... --adapter plan=PATH ...` (same as `lragent serve`)."""

import sys

from lragent.server.cli import main

sys.exit(main())
