"""``async with node:`` and ``async with MemoryNetwork()`` raise what failed, not a group of one.

A Trio nursery wraps even the body's own exception in an ``ExceptionGroup``; the library's
context managers hand the caller the exception itself when it is the only one (and keep real
groups of several), so ``except InvalidArgumentError`` around the block matches.
"""

from __future__ import annotations

import sys

import pytest
import trio

from tinyraftplus import FsLog, RaftNode
from tinyraftplus.errors import InvalidArgumentError, LogLockedError
from tinyraftplus.transport.memory import MemoryNetwork

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

FAST = dict(election_timeout=0.3, ping_timeout=0.05)


def _node(tmp_path, net, i=1, ids=(1,), **kw):
    node = RaftNode(i, list(ids), net.sender(i), FsLog(str(tmp_path), f"n{i}"), **FAST, **kw)
    net.attach(node)
    return node


async def test_node_body_error_comes_out_unwrapped(tmp_path):
    net = MemoryNetwork()
    node = _node(tmp_path, net)
    with pytest.raises(InvalidArgumentError) as info:
        async with node:
            await node.wait_leader()
            await node.append(b"")  # refused: empty payloads are the leader's no-op
    assert type(info.value) is InvalidArgumentError
    assert node.state == "stopped"


async def test_except_clause_around_node_block_matches(tmp_path):
    net = MemoryNetwork()
    node = _node(tmp_path, net)
    caught = None
    try:
        async with node:
            raise InvalidArgumentError("mine")
    except InvalidArgumentError as e:
        caught = e
    assert caught is not None and str(caught) == "mine"


async def test_body_error_keeps_its_context_and_traceback(tmp_path):
    net = MemoryNetwork()
    node = _node(tmp_path, net)
    with pytest.raises(InvalidArgumentError) as info:
        async with node:
            try:
                {}["missing"]
            except KeyError:
                raise InvalidArgumentError("translated") from None
    assert isinstance(info.value.__context__, KeyError)
    assert not isinstance(info.value.__context__, BaseExceptionGroup)
    # the traceback still reaches the line that raised it
    assert any(f.name == "test_body_error_keeps_its_context_and_traceback"
               for f in info.traceback)


async def test_start_failure_comes_out_unwrapped(tmp_path):
    net = MemoryNetwork()
    async with FsLog(str(tmp_path), "n1"):  # holds the lock: the node cannot open the log
        node = _node(tmp_path, net)
        with pytest.raises(LogLockedError):
            async with node:
                pass  # pragma: no cover


async def test_several_errors_stay_a_group(tmp_path):
    net = MemoryNetwork()
    node = _node(tmp_path, net)

    async def boom():
        raise InvalidArgumentError("from a task of mine")

    with pytest.raises(ExceptionGroup) as info:
        async with node:
            async with trio.open_nursery() as n:
                n.start_soon(boom)
                n.start_soon(boom)
    leaves = []

    def walk(e):
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(info.value)
    assert len(leaves) == 2 and all(isinstance(x, InvalidArgumentError) for x in leaves)


async def test_cancellation_still_works(tmp_path):
    net = MemoryNetwork()
    node = _node(tmp_path, net)
    with trio.move_on_after(0.5) as scope:
        async with node:
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert node.state == "stopped"


async def test_keyboard_interrupt_comes_out_bare(tmp_path):
    net = MemoryNetwork()
    node = _node(tmp_path, net)
    with pytest.raises(KeyboardInterrupt) as info:
        async with node:
            await node.wait_leader()
            raise KeyboardInterrupt
    assert type(info.value) is KeyboardInterrupt
    assert node.state == "stopped"


async def test_memory_network_body_error_unwrapped():
    with pytest.raises(InvalidArgumentError) as info:
        async with MemoryNetwork(delay=(0.01, 0.02)) as net:
            net.send(1, 2, "in flight")
            raise InvalidArgumentError("mine")
    assert type(info.value) is InvalidArgumentError


async def test_memory_network_keyboard_interrupt_and_cancel():
    with pytest.raises(KeyboardInterrupt):
        async with MemoryNetwork():
            raise KeyboardInterrupt
    with trio.move_on_after(0.1) as scope:
        async with MemoryNetwork():
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_memory_network_failing_receiver_unwrapped():
    # A receiver that raises during delayed delivery fails the network's nursery: the caller
    # gets that one exception, not a group of one.
    def receive(frm, msg):
        raise InvalidArgumentError("receiver broke")

    with pytest.raises(InvalidArgumentError, match="receiver broke"):
        async with MemoryNetwork(delay=(0.001, 0.002)) as net:
            net.register(2, receive)
            net.send(1, 2, "x")
            await trio.sleep(1)


async def test_interrupt_in_a_node_task_comes_out_bare_not_with_its_consequence(tmp_path):
    # Ctrl-C can land in whichever task runs; here the node's own (the state machine's call).
    # The caller's pending append then fails with NodeStoppedError, a consequence: the
    # caller sees the cause alone.
    def apply(bufs, seq):
        if any(b is not None for b in bufs):
            raise KeyboardInterrupt
        return [None] * len(bufs)

    net = MemoryNetwork()
    node = _node(tmp_path, net, apply=apply)
    with pytest.raises(KeyboardInterrupt) as info:
        async with node:
            await node.wait_leader()
            await node.append(b"x")
    assert type(info.value) is KeyboardInterrupt
    assert node.state == "stopped"


async def test_state_machine_failure_stops_the_node_with_one_error(tmp_path):
    def apply(bufs, seq):
        if any(b is not None for b in bufs):
            raise ZeroDivisionError("my state machine")
        return [None] * len(bufs)

    net = MemoryNetwork()
    node = _node(tmp_path, net, apply=apply)
    # the cause, not a group of it and the NodeStoppedError the pending append got
    with pytest.raises(ZeroDivisionError, match="my state machine"):
        async with node:
            await node.wait_leader()
            await node.append(b"x")
    assert node.state == "stopped"
