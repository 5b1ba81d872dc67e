"""Alias kept for ``python -m tinyraftplus.server`` and old imports: the server lives in
:mod:`tinyraftplus.kv.server`."""

from ..kv.server import *  # noqa: F403
from ..kv.server import __all__  # noqa: F401
