"""Alias kept for ``from tinyraftplus.client import Client``: the client lives in
:mod:`tinyraftplus.kv.client`."""

from ..kv.client import *  # noqa: F403
from ..kv.client import __all__  # noqa: F401
