r"""Mutual TLS between nodes: which certificate names which node, and the SSL contexts.

Identity
--------
A node's certificate names it with a DNS ``subjectAltName``: ``node-<id>.tinyraftplus``
(see :func:`node_dns_name`), for example ``node-1.tinyraftplus`` or
``node-eu-west-2.tinyraftplus``. A DNS name rather than a URI because every tool that issues
certificates (openssl, cfssl, step, trustme) makes DNS SANs, and because the standard hostname
check then does the dialer's half of the work: a node dialing peer 3 sets ``server_hostname``
to ``node-3.tinyraftplus`` and OpenSSL refuses any certificate that does not name it.
The accepting side checks the dialer's certificate itself (:func:`cert_names_node`) against
the id the dialer claims in its ``Hello``.

DNS names are case-insensitive and limited to letters, digits and ``-``, so node ids used
with TLS must be ints >= 0 or strs of those characters (starting and ending with a letter or
digit, at most 58 of them); two ids whose names collide (``1`` and ``"1"``, ``"a"`` and
``"A"``) cannot be told apart by a certificate and are refused in one cluster.

Making certificates with openssl (one CA for the cluster, one certificate per node; the
certificate is used both to accept and to dial, so it needs both key usages)::

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=tinyraftplus cluster CA" -keyout ca.key -out ca.crt
    id=1
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=node-$id" \
        -keyout node-$id.key -out node-$id.csr
    openssl x509 -req -in node-$id.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days 825 -out node-$id.crt -extfile <(printf "%s\n" \
        "subjectAltName=DNS:node-$id.tinyraftplus" "extendedKeyUsage=serverAuth,clientAuth")

then ``TlsConfig.from_files("ca.crt", "node-1.crt", "node-1.key")`` on node 1. Keep
``ca.key`` off the nodes.

Both sides require TLS 1.2 or later, verify against the cluster's CA only (not the system's
trust store: a certificate from a public CA must not admit a node), and require the other side
to present a certificate.
"""

from __future__ import annotations

import os
import re
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError, InvalidArgumentError
from ..raft.messages import NodeId

DNS_SUFFIX = ".tinyraftplus"
_LABEL_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,56}[A-Za-z0-9])?\Z")


def node_dns_name(node_id: NodeId) -> str:
    """The DNS subjectAltName a certificate for ``node_id`` carries: ``node-<id>.tinyraftplus``.

    Raises ``ConfigurationError`` for ids that do not fit in a DNS label (see the module
    docstring).
    """
    if type(node_id) is int:
        if node_id < 0:
            raise ConfigurationError(
                f"node id {node_id} cannot be named in a TLS certificate: use ids >= 0"
            )
        return f"node-{node_id}{DNS_SUFFIX}"
    if type(node_id) is str and _LABEL_ID.match(node_id):
        return f"node-{node_id.lower()}{DNS_SUFFIX}"
    raise ConfigurationError(
        f"node id {node_id!r} cannot be named in a TLS certificate: use an int >= 0 or a str "
        f"of 1..58 letters, digits and '-' that starts and ends with a letter or digit"
    )


def check_distinct_names(ids: Iterable[NodeId]) -> None:
    """Raise ``ConfigurationError`` if two ids map to the same certificate name."""
    seen: dict[str, NodeId] = {}
    for i in ids:
        name = node_dns_name(i)
        if name in seen and seen[name] != i:
            raise ConfigurationError(
                f"node ids {seen[name]!r} and {i!r} both map to the certificate name {name}; "
                f"a certificate could not tell them apart, so rename one"
            )
        seen[name] = i


def cert_dns_names(peercert: dict[str, Any] | None) -> list[str]:
    """The DNS subjectAltNames of a verified peer certificate (``SSLObject.getpeercert()``),
    lower-cased."""
    if not peercert:
        return []
    return [v.lower() for k, v in peercert.get("subjectAltName", ()) if k == "DNS"]


def cert_names_node(peercert: dict[str, Any] | None, node_id: NodeId) -> bool:
    """Whether a verified peer certificate names ``node_id``."""
    try:
        want = node_dns_name(node_id)
    except ConfigurationError:
        return False
    return want in cert_dns_names(peercert)


@dataclass(frozen=True)
class TlsConfig:
    """The two SSL contexts a node needs: one to accept connections (it asks for and verifies
    the client's certificate) and one to dial (it presents the node's certificate and checks
    the server's name).

    Build it with :meth:`from_files` from PEM files, or pass your own contexts (tests do,
    with ``trustme``); :func:`check_context` says what a usable pair must have.
    """

    server_context: ssl.SSLContext
    client_context: ssl.SSLContext
    files: tuple[str, str, str | None] | None = field(default=None, compare=False)
    """``(ca, cert, key)`` when built by :meth:`from_files` (what :meth:`reload` reads)."""
    crl_file: str | None = field(default=None, compare=False)
    """The revocation list :meth:`reload` reads again, if any."""

    def __post_init__(self) -> None:
        check_context(self.server_context, server=True)
        check_context(self.client_context, server=False)

    def reload(self, key_password: str | bytes | None = None) -> None:
        """Read the certificate, key and CA files again into both contexts: connections
        made from now on use the new ones, established ones keep theirs (until the peer's
        certificate expires: the transports close a connection then). A CA file that now
        holds more certificates adds them (to rotate a CA, list old and new until every
        node has a certificate from the new one). Raises ``InvalidArgumentError`` naming a
        file that cannot be used, and then changes nothing."""
        if self.files is None:
            raise InvalidArgumentError("TlsConfig.reload: this configuration was not built "
                                       "from files (TlsConfig.from_files)")
        ca, cert, key = self.files
        # Load into fresh contexts first, so a bad file changes nothing.
        _context(ssl.Purpose.CLIENT_AUTH, ca, cert, key, key_password)
        if self.crl_file is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=self.crl_file)
            except (OSError, ssl.SSLError) as e:
                raise InvalidArgumentError(
                    f"cannot load the revocation list {self.crl_file!r}: {e}") from None
        for ctx in (self.server_context, self.client_context):
            ctx.load_verify_locations(cafile=ca)
            ctx.load_cert_chain(cert, key, key_password)
            if self.crl_file is not None:  # adds the newly revoked (a CRL only grows)
                ctx.load_verify_locations(cafile=self.crl_file)

    @classmethod
    def from_files(
        cls,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str] | None = None,
        *,
        key_password: str | bytes | None = None,
        min_version: str = "1.2",
        crl_file: str | os.PathLike[str] | None = None,
    ) -> TlsConfig:
        """Load the cluster CA, this node's certificate chain and its private key (PEM).

        ``key_file`` may be omitted when ``cert_file`` holds the key too. ``min_version``:
        ``"1.2"`` or ``"1.3"``. ``crl_file``: a PEM certificate revocation list from the CA;
        certificates it lists are refused. Raises ``InvalidArgumentError`` naming the file
        that could not be read or used.
        """
        if min_version not in _TLS_VERSIONS:
            raise InvalidArgumentError(
                f"TLS minimum version {min_version!r}: choose 1.2 or 1.3")
        ctxs = []
        for purpose in (ssl.Purpose.CLIENT_AUTH, ssl.Purpose.SERVER_AUTH):
            ctx = _context(purpose, ca_file, cert_file, key_file, key_password)
            ctx.minimum_version = _TLS_VERSIONS[min_version]
            if crl_file is not None:
                try:
                    ctx.load_verify_locations(cafile=os.fspath(crl_file))
                except (OSError, ssl.SSLError) as e:
                    raise InvalidArgumentError(
                        f"cannot load the revocation list {os.fspath(crl_file)!r}: {e}"
                    ) from None
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            ctxs.append(ctx)
        return cls(server_context=ctxs[0], client_context=ctxs[1],
                   files=(os.fspath(ca_file), os.fspath(cert_file),
                          None if key_file is None else os.fspath(key_file)),
                   crl_file=None if crl_file is None else os.fspath(crl_file))


_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def read_certificate(cert_file: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The fields of a PEM certificate file as ``ssl`` reports a peer's (subjectAltName,
    notAfter, ...), or ``None`` where this Python cannot decode one without a connection."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # pragma: no cover - CPython has had it for a decade
        return None
    try:
        return decode(os.fspath(cert_file))  # type: ignore[no-any-return]
    except (OSError, ssl.SSLError, ValueError) as e:
        raise InvalidArgumentError(
            f"cannot read the certificate {os.fspath(cert_file)!r}: {e}") from None


def check_own_certificate(cert_file: str | os.PathLike[str], node_id: NodeId,
                          *, now: float | None = None) -> None:
    """Refuse to start a node with a certificate that is not its own (another node's, a
    client's) or that has expired: peers would refuse every connection, with errors that
    point elsewhere. Raises ``ConfigurationError`` in one line that names the fix."""
    cert = read_certificate(cert_file)
    if cert is None:
        return
    path = os.fspath(cert_file)
    if not cert_names_node(cert, node_id):
        names = ", ".join(cert_dns_names(cert)) or "no DNS name"
        raise ConfigurationError(
            f"--tls-cert {path} names {names}, but this is node {node_id!r} (--id): give "
            f"each node its own certificate, naming {node_dns_name(node_id)}")
    not_after = cert.get("notAfter")
    if not_after:
        expires = ssl.cert_time_to_seconds(not_after)
        if expires <= (time.time() if now is None else now):
            raise ConfigurationError(
                f"--tls-cert {path} expired on {not_after}: issue a new one from the cluster "
                f"CA")


def cert_expiry(peercert: dict[str, Any] | None) -> float | None:
    """When a (peer) certificate expires, as a ``time.time()`` timestamp, or ``None``."""
    not_after = (peercert or {}).get("notAfter")
    if not not_after:
        return None
    try:
        return float(ssl.cert_time_to_seconds(not_after))
    except ValueError:
        return None


def new_context(*, server: bool) -> ssl.SSLContext:
    """An empty context with this project's settings (no CA, no certificate loaded yet):
    TLS >= 1.2, peer certificate required, hostname checked when dialing, no TLS 1.2
    renegotiation (nothing here needs it, and ``FastStream`` does not carry one out)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = True
    return ctx


def _context(
    purpose: ssl.Purpose,
    ca_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str] | None,
    key_password: str | bytes | None,
) -> ssl.SSLContext:
    ctx = new_context(server=purpose is ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgumentError(
            f"cannot load the cluster CA certificate from {os.fspath(ca_file)!r}: {e}"
        ) from None
    try:
        ctx.load_cert_chain(
            os.fspath(cert_file), None if key_file is None else os.fspath(key_file), key_password
        )
    except (OSError, ssl.SSLError) as e:
        raise InvalidArgumentError(
            f"cannot load this node's certificate {os.fspath(cert_file)!r} / key "
            f"{None if key_file is None else os.fspath(key_file)!r}: {e}; the key must match "
            f"the certificate and both must be PEM"
        ) from None
    return ctx


def check_context(ctx: Any, *, server: bool) -> None:
    """Refuse a context that would silently weaken mutual TLS."""
    side = "server_context" if server else "client_context"
    if not isinstance(ctx, ssl.SSLContext):
        raise InvalidArgumentError(f"TlsConfig.{side} must be an ssl.SSLContext, got {ctx!r}")
    if ctx.verify_mode != ssl.CERT_REQUIRED:
        raise ConfigurationError(
            f"TlsConfig.{side} must have verify_mode=ssl.CERT_REQUIRED: without it a peer "
            f"without a certificate would be let in"
        )
    if not server and not ctx.check_hostname:
        raise ConfigurationError(
            "TlsConfig.client_context must have check_hostname=True: that is how a dialer "
            "checks that the peer it reached holds the certificate of the node it meant to reach"
        )


__all__ = [
    "read_certificate", "check_own_certificate", "cert_expiry",
    "DNS_SUFFIX", "node_dns_name", "check_distinct_names", "cert_dns_names", "cert_names_node",
    "TlsConfig", "new_context", "check_context",
]
