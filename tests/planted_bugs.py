"""Realistic bugs planted in the receiver, sender and allocator; the explorer must catch each.

Each is a small change to the shipped source (see ``resumekit.properties.planting``),
named by what it breaks, with the bounds it is caught under.
"""

from __future__ import annotations

from resumekit.allocator.block_allocator import BlockAllocator
from resumekit.allocator.free_lists import LifoFreeList
from resumekit.properties.bounds import ADVERSARY_BOUNDS, Bounds
from resumekit.properties.planting import Bug
from resumekit.protocol.receiver import ResumableReceiver
from resumekit.protocol.sender import EmbeddingSender

R, SND, A = ResumableReceiver, EmbeddingSender, BlockAllocator

BUGS: list[Bug] = [
    # -- receiver ---------------------------------------------------------------------
    Bug(
        "a refusal of a round never posted frees the round in flight",
        R,
        "_on_refused",
        """            f"but the round in flight is {self._in_flight_epoch(req)}",
            peer_alive=True,""",
        """            f"but the round in flight is {self._in_flight_epoch(req)}",
            peer_alive=True, written=False,""",
    ),
    Bug(
        "a status of an earlier life of the id is taken for the current one",
        R,
        "_on_status",
        "if req is None or req.incarnation != s.incarnation:",
        "if req is None:",
    ),
    Bug(
        "an aborted round goes straight back to the pool",
        R,
        "_fail",
        "Event.FAIL, allocation is not None and peer_alive and written)",
        "Event.FAIL, False)",
    ),
    Bug(
        "the epoch is not advanced after a round is consumed",
        R,
        "_fire",
        "                req.epoch += 1\n",
        "",
    ),
    Bug(
        "the mRoPE delta of round 0 is dropped",
        R,
        "_check_round",
        "req.mrope_delta = aux[AUX_MROPE_DELTA]",
        "req.mrope_delta = 0",
    ),
    Bug(
        "a resume that found no blocks is never retried",
        R,
        "_fire",
        "            self._resumes.append(req)\n        # An admission",
        "            pass\n        # An admission",
    ),
    Bug(
        "admissions are served before waiting resumes",
        R,
        "_serve_waiting",
        "        while resumes:\n",
        "        while resumes and not self._admissions:\n",
    ),
    Bug(
        "a malformed status of an earlier life fails the current one",
        R,
        "_on_malformed",
        "req.incarnation == incarnation and ",
        "",
    ),
    Bug(
        "only the epoch of a status is type-checked",
        R,
        "_on_status",
        "problem = malformed_status(status)",
        'problem = None if type(status.epoch) is int else "epoch"  # type: ignore[attr-defined]',
    ),
    Bug(
        "a newly waiting resume jumps the queue",
        R,
        "_fire",
        "self._resumes.append(req)  # older resumes first",
        "self._resumes.appendleft(req)",
    ),
    Bug(
        "an early post passes a waiting resume",
        R,
        "_fire",
        "resumed = not self._must_wait(req) and self._try_resume(req, early=True)",
        "resumed = self._try_resume(req, early=True)",
    ),
    # -- receiver, under a scheduling policy (resumekit.protocol.policy) ----------------
    Bug(
        "a bulk resume is passed over without end",
        R,
        "_yields",
        "        if req.passed >= self._max_passed_over:\n            return False\n",
        "",
    ),
    Bug(
        "admissions that pass a bulk resume are not counted",
        R,
        "_serve_by_policy",
        "waiting.passed += 1",
        "waiting.passed += 0",
    ),
    Bug(
        "the window is not checked before a waiting round is served",
        R,
        "_serve_by_policy",
        """            if self._window_full():
                return
""",
        "",
    ),
    Bug(
        "a bulk early post passes a waiting bulk resume",
        R,
        "_must_wait",
        "            any(_waits(r) for r in self._resumes)\n            or ",
        "            ",
    ),
    Bug(
        "a waiting resume insists on its whole remainder",
        R,
        "_try_resume",
        "allocation = self.allocator.allocate_up_to(want, req.rid)",
        "allocation = self.allocator.allocate(min(want, self.allocator.capacity_tokens), req.rid)",
    ),
    Bug(
        "an early post's blocks are allocated with no owner",
        R,
        "_try_resume",
        "allocation = self.allocator.allocate(want, req.rid)",
        "allocation = self.allocator.allocate(want, None)",
    ),
    Bug(
        "a landed round's next round queues instead of overlapping the copy-out",
        R,
        "_must_wait",
        "        if not self._yields(req):\n            return False",
        "        if not self._yields(req):\n            return True",
    ),
    Bug(
        "a waiting resume under a policy is left with one block free",
        R,
        "_serve_by_policy",
        "if self.allocator.num_free_blocks == 0 or (yields",
        "if self.allocator.num_free_blocks < 2 or (yields",
    ),
    Bug(
        "a yielding round is posted while another is in flight",
        R,
        "_serve_by_policy",
        " or (yields and self._in_flight() > 0)",
        "",
    ),
    Bug(
        "a yielding early post ignores the round in flight",
        R,
        "_must_wait",
        "\n            or self._in_flight() > 0\n",
        "\n",
    ),
    Bug(
        "no resume is large enough to yield",
        R,
        "_yields",
        "return limit is not None and req.total is not None and req.total - req.sent > limit",
        "return False",
    ),
    Bug(
        "yielding resumes are served oldest first, not fewest tokens left first",
        R,
        "_next_by_policy",
        "if not self._bulk(req) and (best is None or _left(req) < _left(best)):",
        "if not self._bulk(req) and best is None:",
    ),
    Bug(
        "no request is ever bulk",
        R,
        "_bulk",
        "req.total is not None and req.total > bulk",
        "req.total is None and req.total > bulk",
    ),
    Bug(
        "a malformed status fails no request",
        R,
        "_on_malformed",
        'rid = getattr(status, "rid", None)',
        'rid = getattr(status, "RID", None)',
    ),
    Bug(
        "an orphan status resets the orphan count",
        R,
        "_on_status",
        "self.orphan_statuses += 1",
        "self.orphan_statuses = 1",
    ),
    Bug(
        "a status for an old round fails the request",
        R,
        "_on_landed",
        "        if verdict is Verdict.STALE:\n            self._stale(req)\n            return",
        "",
    ),
    Bug(
        "a lost peer leaves the quarantine held",
        R,
        "_on_peer_lost",
        "            self.allocator.free(allocation)  # a dead peer writes nothing more",
        "            pass",
    ),
    Bug(
        "a round the sender refused goes to quarantine, not back to the pool",
        R,
        "_fail",
        "allocation is not None and peer_alive and written)",
        "allocation is not None and peer_alive)",
    ),
    Bug(
        "a lost peer keeps the quarantine",
        R,
        "_on_peer_lost",
        "quarantine, self._quarantine = self._quarantine, {}",
        "quarantine = {}",
    ),
    Bug(
        "a late status of a quarantined round is not matched to it",
        R,
        "_on_status",
        "held = self._quarantine.pop(key, None) if self._quarantine else None",
        "held = None",
    ),
    Bug(
        "the round's token count is not checked against its blocks",
        R,
        "_check_round",
        "        if tokens > allocation.capacity_tokens:",
        "        if False:",
    ),
    # -- sender -----------------------------------------------------------------------
    Bug(
        "a cancel of a round in flight is not answered",
        SND,
        "_cancel",
        "            self.transport.report(Cancelled(rid, cancel.epoch, incarnation=incarnation))",
        "            pass",
    ),
    Bug(
        "one token more than the round holds is written",
        SND,
        "_serve",
        "n = min(src.total - src.sent, post.capacity_tokens)",
        "n = min(src.total - src.sent, post.capacity_tokens + 1)",
    ),
    Bug(
        "the mRoPE delta is not sent with round 0",
        SND,
        "_serve",
        "aux = (src.total, src.mrope_delta) if post.epoch == 0 else None",
        "aux = (src.total, 0) if post.epoch == 0 else None",
    ),
    Bug(
        "a late cancel of an ended life drops the next life's source",
        SND,
        "_cancel",
        "        if not self._stale(rid, incarnation):\n",
        "        if True:\n",
    ),
    Bug(
        "a status carries the wrong incarnation",
        SND,
        "_serve",
        "Landed(rid, post.epoch, n, src.total, final, incarnation=incarnation)",
        "Landed(rid, post.epoch, n, src.total, final, incarnation=incarnation + 1)",
    ),
    # -- allocator --------------------------------------------------------------------
    Bug(
        "generations are reused",
        A,
        "_issue",
        "self._next_generation = generation + 1",
        "self._next_generation = generation",
    ),
    Bug(
        "freed blocks are not returned to the free list",
        A,
        "free",
        "        self._give(blocks)",
        "        pass",
    ),
    Bug(
        "allocate_up_to hands out one block more than is free",
        A,
        "allocate_up_to",
        "n = min(-(-num_tokens // bs), self._num_free)",
        "n = min(-(-num_tokens // bs), self._num_free + 1)",
    ),
    Bug(
        "allocate refuses when exactly enough blocks are free",
        A,
        "allocate",
        "if n > self._num_free:",
        "if n >= self._num_free:",
    ),
    Bug(
        "the free count is not restored on free",
        A,
        "free",
        "self._num_free += len(blocks)",
        "self._num_free += len(blocks) - 1",
    ),
    Bug(
        "a LIFO take hands out blocks still on the stack",
        LifoFreeList,
        "take",
        "        blocks = tuple(stack[-n:])",
        "        blocks = tuple(stack[-n - 1 : -1])",
    ),
    Bug(
        "a refusal of the round before fails the request",
        R,
        "_on_refused",
        "0 <= status.epoch < req.epoch",
        "0 <= status.epoch < req.epoch - 1",
    ),
    # -- what each step accounts for (invariant 8) -------------------------------------
    Bug(
        "a finished request is reported under no id",
        R,
        "_fire",
        "self._finished.append(req.rid)",
        "self._finished.append(None)",
    ),
    Bug(
        "an aborted request is never reported",
        R,
        "_fail",
        "        self._finished.append(req.rid)\n",
        "",
    ),
    Bug(
        "a stale post is counted twice",
        SND,
        "_stale",
        "self.stale_posts += 1",
        "self.stale_posts += 2",
    ),
    Bug(
        "a malformed post is refused without a reason",
        SND,
        "_on_malformed",
        'SenderError(rid, epoch, f"malformed post: {problem}", incarnation=incarnation)',
        "SenderError(rid, epoch, None, incarnation=incarnation)",
    ),
    Bug(
        "a malformed post of round 0 is counted and dropped, its round never refused",
        SND,
        "_on_malformed",
        "type(incarnation) is not int or epoch < 0",
        "type(incarnation) is not int or epoch < 1",
    ),
    Bug(
        "the sender serves a post one round ahead of the next it owes",
        SND,
        "_serve",
        "if post.epoch > src.next_epoch:",
        "if post.epoch > src.next_epoch + 1:",
    ),
    Bug(
        "the sender serves a post that resumes where it did not stop",
        SND,
        "_serve",
        "elif post.sent != src.sent:",
        "elif post.sent < src.sent:",
    ),
    Bug(
        "a resume's post does not say how many tokens its round carries",
        R,
        "_post_round",
        "            expect,\n",
        "            None,\n",
    ),
    Bug(
        "a resume that is not bulk is cut to a bulk round's size",
        R,
        "_try_resume",
        "if self._bulk(req) and want > self._bulk_round_tokens:",
        "if self._bulk(req) or want > self._bulk_round_tokens:",
    ),
    Bug(
        "the sender serves a post that expects more tokens than its round carries",
        SND,
        "_serve",
        "if post.expect_tokens is not None and post.expect_tokens != n:",
        "if post.expect_tokens is not None and post.expect_tokens < n:",
    ),
    Bug(
        "a taken result counts its consumed rounds down",
        R,
        "_fire",
        "            req.rounds += 1\n",
        "            req.rounds -= 1\n",
    ),
    Bug(
        "a step serves one waiting resume and stops, blocks still free",
        R,
        "_serve_waiting",
        "            if not self._try_resume(req):\n",
        "            if self._try_resume(req):\n",
    ),
    Bug(
        "a request added after the peer is lost is cancelled twice",
        R,
        "add",
        'self._fail(req, f"peer lost: {self.peer_lost}", peer_alive=False)',
        'self._fail(req, f"peer lost: {self.peer_lost}", peer_alive=True)',
    ),
    Bug(
        "round 0's total is taken from its status, not checked against its aux row",
        R,
        "_check_round",
        "if aux[AUX_TOTAL_TOKENS] != total:",
        "if False:",
    ),
    Bug(
        "a refusal of the round in flight fails the request without cancelling it",
        R,
        "_on_refused",
        'self._fail(req, f"sender error: {why}", peer_alive=True, written=False)',
        'self._fail(req, f"sender error: {why}", peer_alive=False, written=False)',
    ),
    Bug(
        "passes are not reset when a round is posted",
        R,
        "_post_round",
        "        req.passed = 0\n",
        "        pass\n",
    ),
    Bug(
        "a new sender's PeerBack does not clear the loss",
        R,
        "_on_status",
        "self.peer_lost = None  # a new sender",
        "pass  # a new sender",
    ),
    Bug(
        "round 0's final flag is not checked",
        R,
        "_check_round",
        "if req.sent + tokens > total or status.final != (req.sent + tokens == total):",
        "if req.sent + tokens > total:",
    ),
    Bug(
        "a later round's final flag is not checked",
        R,
        "_check_span",
        "        if status.final != (end == status.total):",
        "        if False:",
    ),
    Bug(
        "a garbled post of a life with no source yet leaves no tombstone",
        SND,
        "_on_malformed",
        """        if src is None:
            self._tombstone(rid, incarnation)
        self._end(rid, incarnation)""",
        """        self._end(rid, incarnation)""",
    ),
    Bug(
        "a later round's total is not checked against round 0's",
        R,
        "_check_round",
        "        if total != req.total:\n",
        "        if False:\n",
    ),
    Bug(
        "a malformed status with an unhashable id raises out of the receiver's step",
        R,
        "_on_malformed",
        """        try:
            req = self._records.get(rid)
        except TypeError:
            return""",
        """        req = self._records.get(rid)""",
    ),
    Bug(
        "a malformed post with an unhashable id raises out of the sender's step",
        SND,
        "_on_malformed",
        """        try:
            hash(rid)
        except TypeError:
            return""",
        """        hash(rid)""",
    ),
    Bug(
        "a status of a finished request is dropped uncounted",
        R,
        "_on_landed",
        """        if req.state.terminal:
            self._stale(req)
            return""",
        """        if req.state.terminal:
            return""",
    ),
    Bug(
        "a Cancel names the round in flight though it was not quarantined",
        R,
        "_fail",
        "req.rid, req.epoch if quarantined else NO_EPOCH, incarnation=req.incarnation",
        "req.rid, req.epoch, incarnation=req.incarnation",
    ),
    Bug(
        "a Cancel that names no round is answered with a status",
        SND,
        "_cancel",
        "        if cancel.epoch != NO_EPOCH:\n",
        "        if True:\n",
    ),
    Bug(
        "a Cancel is served before it is checked",
        SND,
        "step",
        """            problem = malformed_post(post)
            if problem is not None:
                self._on_malformed(post, problem)
            elif type(post) is Cancel:
                self._cancel(post)""",
        """            problem = malformed_post(post)
            if type(post) is Cancel:
                self._cancel(post)
            elif problem is not None:
                self._on_malformed(post, problem)""",
    ),
]

#: Bugs on a path only the fuzzer takes: it names each source's life when it hands it
#: over (the explorer hands sources over unnamed, the other way).
FUZZER_BUGS: list[Bug] = [
    Bug(
        "a named source of an ended life is dropped, its tombstone kept",
        SND,
        "add",
        "                self._untombstone(rid, incarnation)\n",
        "                self._untombstone(rid, None)\n",
    ),
]

#: The bounds each bug is caught under in the tests (the fastest that catches it);
#: ``resumekit verify`` runs the standard bounds and every adversary set.
BOUNDS: dict[str, Bounds] = {
    "small": Bounds(blocks=3, requests=2, max_rounds=3),
    **ADVERSARY_BOUNDS,
}
WHERE: dict[str, str] = {
    "a refusal of a round never posted frees the round in flight": "forged and poisoned",
    "a status of an earlier life of the id is taken for the current one": "id reuse",
    "an aborted round goes straight back to the pool": "small",
    "the epoch is not advanced after a round is consumed": "late sources",
    "the mRoPE delta of round 0 is dropped": "id reuse",
    "a resume that found no blocks is never retried": "squeezed pool",
    "admissions are served before waiting resumes": "squeezed pool",
    "a malformed status of an earlier life fails the current one": "reused, forged and poisoned",
    "only the epoch of a status is type-checked": "reused, forged and poisoned",
    "a newly waiting resume jumps the queue": "squeezed pool",
    "an early post passes a waiting resume": "squeezed pool",
    "a bulk resume is passed over without end": "policy",
    "a malformed post of round 0 is counted and dropped, its round never refused": (
        "forged and poisoned"
    ),
    "the sender serves a post one round ahead of the next it owes": "forged and poisoned",
    "the sender serves a post that resumes where it did not stop": "forged and poisoned",
    "a step serves one waiting resume and stops, blocks still free": "squeezed pool",
    "a request added after the peer is lost is cancelled twice": "crash and grab",
    "round 0's total is taken from its status, not checked against its aux row": (
        "reused, forged and poisoned"
    ),
    "a refusal of the round in flight fails the request without cancelling it": (
        "reused, forged and poisoned"
    ),
    "passes are not reset when a round is posted": "policy, two in flight",
    "a new sender's PeerBack does not clear the loss": "sender restart",
    "round 0's final flag is not checked": "reused, forged and poisoned",
    "a later round's final flag is not checked": "reused, forged and poisoned",
    "a garbled post of a life with no source yet leaves no tombstone": (
        "reused, forged and poisoned"
    ),
    "a later round's total is not checked against round 0's": "reused, forged and poisoned",
    "a malformed status with an unhashable id raises out of the receiver's step": (
        "reused, forged and poisoned"
    ),
    "a malformed post with an unhashable id raises out of the sender's step": (
        "reused, forged and poisoned"
    ),
    "a status of a finished request is dropped uncounted": "id reuse",
    "a Cancel names the round in flight though it was not quarantined": "id reuse",
    "a Cancel that names no round is answered with a status": "id reuse",
    "a Cancel is served before it is checked": "reused, forged and poisoned",
    "admissions that pass a bulk resume are not counted": "policy",
    "the window is not checked before a waiting round is served": "policy",
    "a bulk early post passes a waiting bulk resume": "policy",
    "a waiting resume insists on its whole remainder": "squeezed pool",
    "an early post's blocks are allocated with no owner": "policy",
    "a landed round's next round queues instead of overlapping the copy-out": "policy",
    "a waiting resume under a policy is left with one block free": "policy",
    "no request is ever bulk": "policy",
    "a yielding round is posted while another is in flight": "policy, two in flight",
    "a yielding early post ignores the round in flight": "policy, two in flight",
    "no resume is large enough to yield": "policy, two in flight",
    "yielding resumes are served oldest first, not fewest tokens left first": (
        "policy, two in flight"
    ),
    "a malformed status fails no request": "forged and poisoned",
    "an orphan status resets the orphan count": "id reuse",
    "a status for an old round fails the request": "id reuse",
    "a lost peer leaves the quarantine held": "small",
    "a round the sender refused goes to quarantine, not back to the pool": "forged and poisoned",
    "a lost peer keeps the quarantine": "small",
    "a late status of a quarantined round is not matched to it": "late sources",
    "the round's token count is not checked against its blocks": "forged and poisoned",
    "a cancel of a round in flight is not answered": "late sources",
    "one token more than the round holds is written": "squeezed pool",
    "the mRoPE delta is not sent with round 0": "id reuse",
    "a late cancel of an ended life drops the next life's source": "id reuse",
    "a status carries the wrong incarnation": "id reuse",
    "generations are reused": "small",
    "freed blocks are not returned to the free list": "squeezed pool",
    "allocate_up_to hands out one block more than is free": "squeezed pool",
    "allocate refuses when exactly enough blocks are free": "squeezed pool",
    "the free count is not restored on free": "squeezed pool",
    "a LIFO take hands out blocks still on the stack": "squeezed pool",
    "a refusal of the round before fails the request": "forged and poisoned",
    "a finished request is reported under no id": "small",
    "an aborted request is never reported": "small",
    "a stale post is counted twice": "id reuse",
    "a malformed post is refused without a reason": "forged and poisoned",
    "a resume's post does not say how many tokens its round carries": "small",
    "a resume that is not bulk is cut to a bulk round's size": "policy, two in flight",
    "a taken result counts its consumed rounds down": "small",
    "the sender serves a post that expects more tokens than its round carries": (
        "forged and poisoned"
    ),
}


def bounds_for(bug: Bug) -> Bounds:
    return BOUNDS[WHERE[bug.name]]
