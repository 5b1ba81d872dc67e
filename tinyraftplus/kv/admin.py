"""``python -m tinyraftplus.admin`` (or ``tinyraftplus.kv.admin``): look at and change a
running cluster's membership over the client port, with the same mutual TLS as clients.

    python -m tinyraftplus.admin --peers 10.0.0.1:7101,10.0.0.2:7101 \\
        --tls-ca ca.crt --tls-cert ops.crt --tls-key ops.key  status
    ... add-learner 4 10.0.0.4:7001 | promote 4 | remove 2 | transfer-leader [3]

``--peers`` lists client addresses (any of the nodes; all is best). Changes go to the
leader (found as the client finds it for writes) and are answered once committed; the tool
prints the new configuration and exits 0. A refusal or failure is one line on stderr and exit
status 1 (``--debug`` adds the traceback); a usage mistake exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import trio

from ..errors import TinyRaftError, UsageError
from .client import Client, client_ssl_context, parse_address

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _node_id(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinyraftplus.admin",
                                description="Membership and status of a tinyraftplus "
                                            "key-value cluster.")
    p.add_argument("--peers", required=True,
                   help="client addresses of the nodes: host:port,host:port,...")
    p.add_argument("--tls-ca", help="the cluster CA certificate (PEM)")
    p.add_argument("--tls-cert", help="this client's certificate (PEM)")
    p.add_argument("--tls-key", help="this client's private key (PEM)")
    p.add_argument("--plaintext", action="store_true", help="for a --plaintext cluster")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="give up after this long (default: 30)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="every node's role, term, seqs and configuration")
    a = sub.add_parser("add-learner", help="add a node as a learner (it must run --join)")
    a.add_argument("id")
    a.add_argument("addr", metavar="HOST:PORT", help="the new node's peer address")
    sub.add_parser("promote", help="make a caught-up learner a voter").add_argument("id")
    sub.add_parser("remove", help="remove a voter or learner").add_argument("id")
    t = sub.add_parser("transfer-leader", help="hand leadership to a voter (default: the "
                                               "most up-to-date)")
    t.add_argument("id", nargs="?")
    return p


def _ids(v: Any) -> str:
    return "{" + ", ".join(map(str, v or ())) + "}"


def format_status(statuses: dict[Any, dict[str, Any]]) -> list[str]:
    lines = []
    for nid in sorted(statuses, key=repr):
        st = statuses[nid]
        if st.get("state") == "stopped":
            lines.append(f"node {nid}: stopped")
            continue
        cfg = f"voters {_ids(st.get('voters'))}"
        if st.get("outgoing"):
            cfg += f" joint with {_ids(st.get('outgoing'))}"
        if st.get("learners"):
            cfg += f", learners {_ids(st.get('learners'))}"
        lines.append(
            f"node {nid}: {st.get('role', st.get('state'))} term {st.get('term')} leader "
            f"{st.get('leader')} seqs first {st.get('first_seq')} last {st.get('last_seq')} "
            f"commit {st.get('commit_seq')} apply {st.get('apply_seq')}; {cfg} (seq "
            f"{st.get('config_seq')})" + (" recovering" if st.get("recovering") else ""))
        for fid in sorted(st.get("followers") or {}, key=repr):
            f = st["followers"][fid]
            lines.append(f"  follower {fid}: match {f.get('match')} next {f.get('next')} "
                         f"{f.get('state')} inflight {f.get('inflight')}")
    return lines


async def run(a: argparse.Namespace) -> list[str]:
    addrs = [x.strip().partition("=")[2] or x.strip() for x in a.peers.split(",") if x.strip()]
    for x in addrs:
        parse_address(x)
    tls = None
    if not a.plaintext:
        if not (a.tls_ca and a.tls_cert):
            raise UsageError("give --tls-ca, --tls-cert and --tls-key (the cluster's mutual "
                             "TLS), or --plaintext for a --plaintext cluster")
        tls = client_ssl_context(a.tls_ca, a.tls_cert, a.tls_key)
    async with Client(addrs, tls=tls, plaintext=a.plaintext, timeout=a.timeout,
                      attempt_timeout=min(3.0, a.timeout)) as c:
        if a.command == "status":
            st = await c.cluster_status()
            if not st:
                raise TinyRaftError(f"no node answered at {', '.join(addrs)}")
            return [json.dumps(st, sort_keys=True, default=str)] if a.json \
                else format_status(st)
        if a.command == "add-learner":
            parse_address(a.addr)
            r = await c.add_learner(_node_id(a.id), a.addr)
            what = f"added learner {a.id} at {a.addr}"
        elif a.command == "promote":
            r = await c.promote(_node_id(a.id))
            what = f"promoted {a.id} to voter"
        elif a.command == "remove":
            r = await c.remove_node(_node_id(a.id))
            what = f"removed {a.id}"
        else:
            r = await c.transfer_leadership(None if a.id is None else _node_id(a.id))
            what = f"leadership transferred to {r.get('leader')}"
        if a.json:
            return [json.dumps(r, sort_keys=True, default=str)]
        return [f"{what}; configuration: {r.get('config')}; leader {r.get('leader')}"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(args)  # exits 2 on a usage mistake
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if a.debug else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        lines = trio.run(run, a)
    except UsageError as e:
        if a.debug:
            raise
        print(f"tinyraftplus.admin: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (TinyRaftError, OSError) as e:
        if a.debug:
            raise
        print(f"tinyraftplus.admin: {a.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    for line in lines:
        print(line)
    return EXIT_OK


__all__ = ["main", "build_parser", "format_status"]


if __name__ == "__main__":
    sys.exit(main())
