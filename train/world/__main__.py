"""python -m train.world"""

import sys

from .generate import main

sys.exit(main())
