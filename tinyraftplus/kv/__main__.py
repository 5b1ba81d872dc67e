"""``python -m tinyraftplus.kv``: run one node of the key-value store (see ``server``)."""

import sys

from .server import main

sys.exit(main())
