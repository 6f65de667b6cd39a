"""How the explorer prints a counterexample: one line per action, in words.

Each line describes an action as taken from the world it was taken in, so a
trace reads as what the engine, the network and the adversary did, in order.
"""

from __future__ import annotations

from typing import Any

from resumekit.properties.abstraction import status_order
from resumekit.properties.bounds import PREMATURE, TRUNCATED
from resumekit.properties.world import World
from resumekit.protocol import messages as msg


def _life(w: World, rid: Any, incarnation: Any) -> str:
    life = w.ledger.lives.get(incarnation)
    return f"r{rid}" if life in (None, 1) and max(w.lives) == 1 else f"r{rid}#{life or '?'}"


def status_text(s: object, w: World | None = None) -> str:
    kind = type(s)
    if kind not in msg.ROUND_STATUSES:
        return f"{kind.__name__}({getattr(s, 'reason', '')})"
    st: msg.Landed = s  # type: ignore[assignment]
    who = f"r{st.rid}" if w is None else _life(w, st.rid, st.incarnation)
    if msg.malformed_status(s) is not None:
        return f"a malformed {kind.__name__} for {who} (epoch {st.epoch!r})"
    if kind is msg.Landed:
        final = ", final" if st.final else ""
        return f"Landed({who}, epoch {st.epoch}, {st.tokens} token(s) of {st.total}{final})"
    if kind is msg.Cancelled:
        return f"Cancelled({who}, epoch {st.epoch})"
    return f"SenderError({who}, epoch {st.epoch}: {s.reason})"  # type: ignore[attr-defined]


def post_text(p: msg.Post, w: World | None = None) -> str:
    who = f"r{p.rid}" if w is None else _life(w, p.rid, p.incarnation)
    if type(p) is msg.Cancel:
        return f"Cancel({who}, epoch {p.epoch})"
    assert isinstance(p, msg.RoundPost)
    return (
        f"round {p.epoch} of {who} from token {p.sent} ({p.capacity_tokens} token(s)) "
        f"into blocks {list(p.blocks)}"
    )


def action_text(action: tuple[Any, ...], before: World) -> str:
    """One line of a counterexample, describing ``action`` taken from world ``before``."""
    kind = action[0]
    t, w = before.transport, before
    if kind == "add":
        r = action[1]
        life = "" if w.lives[r] == 1 else f" again (life {w.lives[r]})"
        return f"engine adds r{r}{life} ({w.totals[r]} token(s))"
    if kind == "encode":
        return f"encoder finishes r{action[1]}: its source goes to the sender"
    if kind == "step":
        return "receiver steps with no status (serves requests waiting for blocks)"
    if kind == "deliver":
        return f"receiver steps and gets {status_text(action[1], w)}"
    if kind == "event":
        return f"receiver steps and gets {status_text(t.events[0], w)}"
    if kind == "deliver-all":
        batch = ", ".join(
            status_text(s, w) for s in (*t.events, *sorted(t.statuses, key=status_order))
        )
        return f"receiver steps and gets the batch [{batch}]"
    if kind == "send":
        p = t.posts[0]
        verb = "gets" if type(p) is msg.Cancel else "writes"
        return f"sender {verb} {post_text(p, w)}"
    if kind == "duplicate":
        return f"transport duplicates {status_text(action[1], w)}"
    if kind == "abort":
        return f"engine aborts r{action[1]}"
    if kind == "crash":
        return "sender crashes"
    if kind == "crash-mid-round":
        return f"sender writes {post_text(t.posts[0], w)}, then crashes before reporting it"
    if kind == "squeeze":
        return "another pool user takes a free block"
    if kind == "grab":
        return "another pool user will take a block right after the next free"
    if kind == "unsqueeze":
        return "the other pool user returns a block"
    if kind == "forge":
        which = (
            "round in flight"
            if action[2] in ("oversized", PREMATURE, TRUNCATED)
            else "earlier life"
            if action[3] == "stale"
            else "round consumed already"
            if action[3] == "old"
            else "a far-future round"
            if action[3]
            else "its next round (not posted)"
        )
        return f"receiver steps and gets a forged {action[2]} status for r{action[1]}'s {which}"
    if kind == "reuse":
        return f"engine takes r{action[1]} and will add the id again for a new request"
    if kind == "restart":
        return "sender restarts (a fresh sender with no records takes over)"
    if kind == "poison":
        if action[2] == "stale":
            return f"transport corrupts a status of r{action[1]}'s earlier life"
        return f"transport corrupts a status for r{action[1]} (its {action[2]} ill-typed)"
    if kind == "poison-post" and action[2] == "ahead":
        return f"sender gets a post for r{action[1]} that skips a round"
    if kind == "poison-post" and action[2] == "askew":
        return f"sender gets a post for r{action[1]} that resumes past the tokens it sent"
    if kind == "poison-post" and action[2] == "miscounted":
        return f"sender gets a post for r{action[1]} expecting a token more than it carries"
    if kind == "poison-post" and action[2] == "cancel":
        return f"sender gets a corrupted Cancel for r{action[1]} (its incarnation ill-typed)"
    if kind == "poison-post":
        return f"sender gets a corrupted post for r{action[1]} (its {action[2]} ill-typed)"
    return repr(action)
