"""Alias kept for ``python -m tinyraftplus.server`` and old imports: the server lives in
:mod:`tinyraftplus.kv.server`."""

import sys

from .kv.server import *  # noqa: F403
from .kv.server import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
