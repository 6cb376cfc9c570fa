"""`python -m bertscale ...`: the same as the `bertscale` console script."""

import sys

from bertscale.commands import main

sys.exit(main())
