"""`python -m bertscale ...`: the same as the `bertscale` console script."""

import sys

from bertscale.cli import main

sys.exit(main())
