"""python -m train.stage0"""

import sys

from .run import main

sys.exit(main())
