"""The replicated key-value store built on tinyraftplus: an application of the library, not
part of it.

- :mod:`tinyraftplus.kv.store`: ``KVStore``, the deterministic state machine with client
  sessions (exactly-once writes).
- :mod:`tinyraftplus.kv.server`: ``python -m tinyraftplus.kv`` (or the older spelling
  ``python -m tinyraftplus.server``), one node of the store over mutual TLS.
- :mod:`tinyraftplus.kv.client`: ``Client``, the Trio client (also importable as
  ``tinyraftplus.client``).
- :mod:`tinyraftplus.kv.admin`: ``python -m tinyraftplus.admin``, status and membership
  changes (add-learner, promote, remove, transfer-leader) over the client port.
"""

from .store import (
    MAX_KEY,
    MAX_VALUE,
    OPS,
    KVStore,
    check_key,
    check_write,
    encode_register,
    encode_write,
)

__all__ = ["KVStore", "encode_write", "encode_register", "check_write", "check_key", "OPS",
           "MAX_KEY", "MAX_VALUE"]
