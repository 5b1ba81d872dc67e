"""``python -m tinyraftplus.admin``: the same as ``python -m tinyraftplus.kv.admin``."""

import sys

from .kv.admin import main

if __name__ == "__main__":
    sys.exit(main())
