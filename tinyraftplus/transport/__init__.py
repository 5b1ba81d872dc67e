"""Transports: how messages travel between nodes.

* ``memory.MemoryNetwork``: in one process, with fault injection (tests, examples, benchmarks).
* ``tcp.TcpTransport``: between processes and machines, framed msgpack over TCP with mutual TLS.
"""
