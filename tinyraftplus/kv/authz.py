"""Optional per-client authorization for the key-value server (``--authz FILE``): which client
certificates may read and write which key prefixes, as etcd's RBAC maps a certificate's
common name to a user.

The file is JSON: identities (as the server names them: ``dns:<first DNS name>`` or
``cn:<common name>``, see :func:`~tinyraftplus.kv.server.cert_identity`) to the key prefixes
they may read and write; ``"*"`` applies to every identity not listed::

    {"dns:billing.example": {"read": ["billing/", "shared/"], "write": ["billing/"]},
     "*": {"read": ["shared/"], "write": []}}

Without the option every client the CA signed may read and write every key. The check runs
at the node the client is connected to, before anything reaches the log; a refused request
is answered ``forbidden`` (the client raises ``ForbiddenError``, a ``PermissionError``).
The file is read again on SIGHUP.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import ConfigurationError


class Authorization:
    """Key-prefix permissions per identity, from a JSON file (see the module docstring)."""

    def __init__(self, rules: dict[str, dict[str, list[bytes]]], path: str = "") -> None:
        self.rules = rules
        self.path = path

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Authorization:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigurationError(f"--authz {path}: cannot read it as JSON ({e})") from None
        return cls(_parse(raw, path), path)

    def reload(self) -> None:
        self.rules = Authorization.from_file(self.path).rules

    def allows(self, identity: str, action: str, key: bytes) -> bool:
        """Whether ``identity`` may ``action`` ("read" or "write") ``key``."""
        rule = self.rules.get(identity, self.rules.get("*"))
        if rule is None:
            return False
        return any(key.startswith(p) for p in rule.get(action, ()))


def _parse(raw: Any, path: str) -> dict[str, dict[str, list[bytes]]]:
    if not isinstance(raw, dict):
        raise ConfigurationError(f"--authz {path}: the top level must be an object mapping "
                                 f"identities to {{\"read\": [...], \"write\": [...]}}")
    out: dict[str, dict[str, list[bytes]]] = {}
    for ident, rule in raw.items():
        if not isinstance(rule, dict) or not set(rule) <= {"read", "write"}:
            raise ConfigurationError(f"--authz {path}: {ident!r} must map to an object with "
                                     f"\"read\" and/or \"write\" lists of key prefixes")
        out[ident] = {}
        for action, prefixes in rule.items():
            if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
                raise ConfigurationError(f"--authz {path}: {ident!r} {action!r} must be a list "
                                         f"of key prefixes (strings; \"\" is every key)")
            out[ident][action] = [p.encode() for p in prefixes]
    return out


__all__ = ["Authorization"]
