"""``python -m landscape`` is the ``landscape`` command."""

import sys

from landscape.start import main

sys.exit(main())
