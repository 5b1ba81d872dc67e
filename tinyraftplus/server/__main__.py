"""``python -m tinyraftplus.server``: the same as ``python -m tinyraftplus.kv``."""

import sys

from ..kv.server import main

sys.exit(main())
