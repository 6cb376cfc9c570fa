import sys

from bertscale.bench import main

sys.exit(main())
