"""Optional per-client authorization for the key-value server (``--authz FILE``): which client
certificates may read and write which key prefixes, as etcd's RBAC maps a certificate's
common name to a user.

The file is JSON: identities (as the server names them: ``dns:<first DNS name>`` or
``cn:<common name>``, see :func:`~tinyraftplus.kv.server.cert_identity`) to the key prefixes
they may read and write; ``"*"`` applies to every identity not listed::

    {"dns:billing.example": {"read": ["billing/", "shared/"], "write": ["billing/"]},
     "*": {"read": ["shared/"], "write": []}}

An identity may also carry ``"admin": true``: it may then send admin requests (membership
changes, leadership transfer; see :class:`AdminPolicy`). Without the option every client the
CA signed may read and write every key. The check runs
at the node the client is connected to, before anything reaches the log; a refused request
is answered ``forbidden`` (the client raises ``ForbiddenError``, a ``PermissionError``).
The file is read again on SIGHUP.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigurationError


class Authorization:
    """Key-prefix permissions per identity, from a JSON file (see the module docstring)."""

    def __init__(self, rules: dict[str, dict[str, list[bytes]]], path: str = "",
                 admins: frozenset[str] = frozenset()) -> None:
        self.rules = rules
        self.path = path
        self.admins = admins
        """Identities with ``"admin": true`` (``"*"``: every identity)."""

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Authorization:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigurationError(f"--authz {path}: cannot read it as JSON ({e})") from None
        admins: set[str] = set()
        if isinstance(raw, dict):
            for k, v in raw.items():
                if isinstance(v, dict) and "admin" in v:
                    flag = v.pop("admin")
                    if type(flag) is not bool:
                        raise ConfigurationError(f"--authz {path}: {k!r} \"admin\" must be "
                                                 f"true or false")
                    if flag:
                        admins.add(k)
        return cls(_parse(raw, path), path, frozenset(admins))

    def reload(self) -> None:
        new = Authorization.from_file(self.path)
        self.rules, self.admins = new.rules, new.admins

    def allows(self, identity: str, action: str, key: bytes) -> bool:
        """Whether ``identity`` may ``action`` ("read" or "write") ``key``."""
        rule = self.rules.get(identity, self.rules.get("*"))
        if rule is None:
            return False
        return any(key.startswith(p) for p in rule.get(action, ()))


class AdminPolicy:
    """Who may send admin requests (``add-learner``, ``promote``, ``remove``,
    ``transfer-leader``): identities matching one of ``patterns`` (``fnmatch``, e.g.
    ``dns:ops.example`` or ``cn:admin-*``, from ``--admin-allow`` or the lines of
    ``--admin-allow-file``) or marked ``"admin": true`` in the ``--authz`` file. Status
    requests stay open to every client."""

    def __init__(self, patterns: Sequence[str] = (), file: str | None = None,
                 authz: Authorization | None = None) -> None:
        self.patterns = list(patterns)
        self.file = file
        self.authz = authz
        self.from_file: list[str] = []
        if file is not None:
            self.reload()

    def reload(self) -> None:
        """Read ``--admin-allow-file`` again (SIGHUP): one identity or pattern a line,
        ``#`` comments."""
        if self.file is None:
            return
        try:
            with open(self.file, encoding="utf-8") as f:
                lines = [ln.split("#", 1)[0].strip() for ln in f]
        except OSError as e:
            raise ConfigurationError(f"--admin-allow-file {self.file}: cannot read it "
                                     f"({e.strerror or e})") from None
        self.from_file = [ln for ln in lines if ln]

    def allows(self, identity: str) -> bool:
        if self.authz is not None and (identity in self.authz.admins
                                       or "*" in self.authz.admins):
            return True
        return any(fnmatch.fnmatchcase(identity, p) for p in self.patterns + self.from_file)


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


__all__ = ["Authorization", "AdminPolicy"]
