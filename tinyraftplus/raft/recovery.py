"""Member identity and recovery: a node that lost its durable state never acts as the member
it was.

Why
---
Raft's safety rests on two promises every member keeps across crashes: it votes at most once
per term, and it never forgets an entry it acknowledged. Both live on its disk. A node whose
disk was wiped (or replaced, or restored from an old backup) keeps its node id but has
broken both promises: it may vote a second time in a term it already voted in (two leaders
in one term), and a leader may have counted its acknowledgement toward committing an entry
that it no longer has (a candidate without that entry can then win with its vote, and the
committed entry is overwritten). Three defences, each cheap:

1. **Incarnations.** A member's durable state carries an *incarnation*, created when that
   state is first written and larger than any earlier incarnation of the same id. Every
   message carries its sender's (``inc``; its low bit says whether recovery made it). A
   receiver remembers each peer's incarnation durably and drops messages from an older one,
   so a delayed acknowledgement from the wiped member's past life is never counted. A
   leader that sees a peer's incarnation change forgets that peer's progress (its
   ``match``) at once.
2. **Explicit bootstrap.** A node that starts with no state creates a fresh one only if the
   caller says the cluster is new (``bootstrap=True``: etcd's ``--initial-cluster-state new``,
   hashicorp's ``BootstrapCluster``). Otherwise it *recovers* (below). A peer that meets a
   new incarnation of a member it knew, from a node that did not recover, ignores it and
   reports it (the node was bootstrapped again after losing its data: an operator error).
3. **Recovery** (protocol-aware recovery, as in Alagappan et al., FAST'18), in two phases
   that are persisted, so a crash in the middle resumes them:

   * ``LEARN_TERM``: the node asks *every other voter* for its durable term and log end
     (``Recover``; also the voters of every configuration an answer names, in case it was
     started with an outdated one) and acts on nothing else: it neither votes, nor campaigns, nor
     acknowledges. Any term this node could have voted in before it lost its state is the
     term of a candidate that persisted it before asking for the vote, and terms never go
     back, so once every other member has answered, the largest term reported bounds every
     vote it may have cast. It then moves to that term, marked as already voted (for
     itself), so it can never vote in it again. Asking only a quorum would not do: the
     candidate it voted for may be outside the quorum that answered.
   * ``CATCH_UP``: its term is now safe, so it replicates and acknowledges like any follower
     (an acknowledgement promises only what it now holds durably). The most up-to-date log
     reported in phase 1 holds every entry committed before the wipe (Raft's election
     argument), so until its own durable log has caught up with it, the node votes only
     for a candidate whose log is at least as up to date as that one: its vote can never
     help a candidate that lacks a committed entry. Then recovery is over.

   A recovery therefore needs every other member up once. A member that stays down must be
   removed from the configuration first (membership change); until then the recovering
   node waits and says why (``recovery_waiting_for``).

A node whose hard state survived but whose log did not (``has_log`` with an empty log) is
refused by the driver with the same advice: it is not the member it was either. A leader
that finds a follower of unchanged incarnation reporting a log shorter than what it
acknowledged treats it as a lost member: it warns and stops counting it.

This module holds the core's methods for all of the above (a mixin of ``RaftCore``), so the
rest of the core only calls ``_check_inc`` on each message and asks ``_recovering``.
"""

from __future__ import annotations

from typing import Any

from .membership import Config, QuorumRule
from .messages import AppendResponse, CoreMessage, NodeId, Recover, RecoverResponse
from .progress import Progress
from .raftlog import RaftLog
from .state import CATCH_UP, LEARN_TERM, Recovery

RECOVERED = 1
"""The low bit of an incarnation created by recovery (bootstrap makes even ones). A peer that
was not asked during a member's recovery (a learner, a node added since) still tells a
recovered member from one bootstrapped again after losing its data."""


def new_incarnation(base: int, recovering: bool) -> int:
    """An incarnation from ``base`` (larger than any earlier one of this node id: the wall
    clock in the driver, a counter in the simulator) that records how it was created."""
    return base << 1 | (RECOVERED if recovering else 0)


class MemberIdentity:
    """Incarnation checks and recovery (see the module docstring). Mixed into ``RaftCore``,
    whose fields it uses; they are declared here so that each side can be read alone."""

    _id: NodeId
    _peers: tuple[NodeId, ...]
    _term: int
    _vote: NodeId | None
    _inc: int
    _peer_inc: dict[NodeId, int]
    _recovery: Recovery | None
    _recover_replies: dict[NodeId, RecoverResponse]
    _recover_also: set[NodeId]
    _voters: tuple[NodeId, ...]
    _config: Config
    _rule: QuorumRule
    _hs_changed: bool
    _log: RaftLog
    _now: float
    _election_deadline: float
    _prs: dict[NodeId, Progress]
    _dirty: set[NodeId]
    _msgs: list[tuple[NodeId, CoreMessage]]
    _msgs_after: list[tuple[NodeId, CoreMessage]]
    _warnings: list[str]
    _read_round: int

    def _reset_election_timer(self) -> None:
        raise NotImplementedError  # RaftCore's

    def _heartbeat_interval(self) -> float:
        raise NotImplementedError  # RaftCore's

    # --- incarnations ------------------------------------------------------------------
    def _check_inc(self, frm: NodeId, msg: Any) -> bool:
        """Whether a message whose ``inc`` differs from the one known for ``frm`` may be
        handled; adopts a legitimate new incarnation."""
        inc = msg.inc
        known = self._peer_inc.get(frm, 0)
        if inc < known:
            return False  # from a past life of that node: never count it
        if known and type(msg) is not Recover and not inc & RECOVERED:
            if inc == 0:
                return False  # a node of the first wave among upgraded ones: cannot tell
            # A new identity that did not recover: bootstrapped again after losing its data.
            # Whatever its old incarnation acknowledged is gone: stop counting it at once.
            pr = self._prs.get(frm)
            if pr is not None and not pr.lost:
                pr.forget(self._log.last_seq + 1, self._now, self._read_round)
                self._read_round += 1
                pr.lost = True
            self._warnings.append(
                f"node {frm!r} came back with new state (incarnation {inc}, was {known}) "
                "without recovering: it lost its data and was started with bootstrap; its "
                "messages are ignored. Stop it and start it without bootstrap to rejoin"
            )
            return False
        self._peer_inc[frm] = inc
        self._hs_changed = True
        pr = self._prs.get(frm)
        if pr is not None and known:
            # Whatever it acknowledged before is gone with its old state.
            pr.forget(self._log.last_seq + 1, self._now, self._read_round)
            self._read_round += 1  # later heartbeats carry ids from the floor on
            self._dirty.add(frm)
        return True

    # --- recovery, as the recovering node ----------------------------------------------
    @property
    def recovering(self) -> bool:
        """True until this member has rebuilt its state after losing it (see module doc)."""
        return self._recovery is not None

    @property
    def recovery_waiting_for(self) -> list[NodeId]:
        """In recovery phase 1: the members that have not answered yet."""
        rec = self._recovery
        if rec is None or rec.phase != LEARN_TERM:
            return []
        ask = set(self._voters) | self._recover_also
        return sorted((p for p in ask if p not in self._recover_replies and p != self._id),
                      key=repr)

    def _recovery_tick(self) -> None:
        """While recovering, every heartbeat interval: ask again whoever has not answered
        (phase 1; a member that was not up yet when first asked is asked again soon), or
        check the log (phase 2). Never campaigns."""
        self._election_deadline = self._now + self._heartbeat_interval()
        rec = self._recovery
        assert rec is not None
        if rec.phase == LEARN_TERM:
            req = Recover(self._term, self._inc)
            for p in self.recovery_waiting_for:
                self._msgs.append((p, req))
            self._maybe_fence()
        else:
            self._maybe_recovered()

    def _on_recover_response(self, frm: NodeId, m: RecoverResponse) -> None:
        rec = self._recovery
        if rec is None or rec.phase != LEARN_TERM:
            return
        self._recover_replies[frm] = m
        # Voters of a configuration we did not know (ours may be outdated) must answer too.
        self._recover_also.update(m.voters)
        self._maybe_fence()

    def _maybe_fence(self) -> None:
        if self.recovery_waiting_for:
            return
        replies = list(self._recover_replies.values())
        top_term = max([self._term, *(r.term for r in replies)])
        # The target: a log every entry committed before the wipe is in. Such an entry was
        # on a quorum, so on at least (quorum - 1) of the others: with majorities, on at
        # least k of the logs reported, so the k-th most up to date of them is at least as
        # up to date as one that holds it. (The most up-to-date one would do too, but it
        # may end in entries nobody will commit, held by a node that will never lead.)
        logs = sorted(((r.last_term, r.last_seq) for r in replies), reverse=True)
        k = 1
        if self._rule.majority:
            sizes = [len(self._config.all_voters)] + [len(r.voters) for r in replies if r.voters]
            k = max(1, min(n // 2 for n in sizes))
        tterm, tseq = logs[min(k, len(logs)) - 1] if logs else (0, -1)
        # Fence: at the highest term any member knows, already voted (for itself), so no
        # vote in a term it may have voted in before can be cast again.
        self._term = top_term
        self._vote = self._id
        self._recovery = Recovery(CATCH_UP, tseq, tterm)
        self._recover_replies = {}
        self._recover_also = set()
        self._hs_changed = True
        self._maybe_recovered()

    def _maybe_recovered(self) -> None:
        rec = self._recovery
        if rec is None or rec.phase != CATCH_UP:
            return
        log = self._log
        if log.stable < log.last_seq:
            return  # judge only what is durable
        if (log.last_term, log.last_seq) >= (rec.target_term, rec.target_seq):
            self._recovery = None
            self._hs_changed = True
            self._reset_election_timer()  # a follower again, on the usual timer
            if not self._peers:
                self._election_deadline = self._now  # alone: elect itself at once

    def _may_vote_for(self, last_seq: int, last_term: int) -> bool:
        """Recovery's condition on a vote (besides Raft's own): none in ``LEARN_TERM``; in
        ``CATCH_UP`` only for a candidate whose log is at least as up to date as the best
        one reported, which therefore holds every entry committed before this member lost
        its state (so the vote cannot help elect a leader without one). Without this a
        recovering member of a small configuration could stall an election it must join."""
        rec = self._recovery
        if rec is None:
            return True
        if rec.phase == LEARN_TERM:
            return False
        return (last_term, last_seq) >= (rec.target_term, rec.target_seq)

    # --- recovery, as a peer -----------------------------------------------------------
    def _on_recover(self, frm: NodeId, m: Recover) -> None:
        # Sent after persisting: the term and the log end we report are durable, and so is
        # the new incarnation we adopted (``_check_inc``).
        log = self._log
        voters = tuple(sorted(self._config.all_voters, key=repr))
        self._msgs_after.append(
            (frm, RecoverResponse(self._term, log.last_seq, log.last_term, voters, self._inc))
        )

    # --- a follower that lost entries it acknowledged -----------------------------------
    def _lost_member(self, frm: NodeId, m: AppendResponse) -> None:
        pr = self._prs[frm]
        if pr.lost:
            return
        pr.lost = True
        self._warnings.append(
            f"node {frm!r} no longer holds entries through seq {pr.match} that it "
            f"acknowledged (it reports its log ends before seq {m.conflict_seq}): it lost "
            "data without losing its identity, so this leader no longer counts it toward "
            "commits or reads. Stop it, delete its state (log and .raftstate) and restart "
            "it without bootstrap so that it recovers"
        )


__all__ = ["MemberIdentity"]
