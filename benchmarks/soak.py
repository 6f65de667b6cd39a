"""Soak: many lives through the real receiver, sender and allocator; nothing stuck, nothing leaked.

    python benchmarks/soak.py [--requests 2000] [--ids 300] [--seed 0]
                              [--mooncake-requests 200] [--mooncake-tokens 200000]

In process (:class:`InProcessTransport`): ``--requests`` lives over ``--ids`` request
ids, so ids are reused; each life's source is named (the incarnation the receiver
returned) or not, at random; a tenth are aborted at a random moment; sources come
late (the encoder is slow, after the abort too: the sender must recognise them);
statuses are held back for a few steps now and then (a slow link). Sources of one
id are delivered in life order, as an encoder serving them in order would.

Over Mooncake (``run_pair``, two processes, TCP): ``--mooncake-requests`` requests of
up to ``--mooncake-tokens`` tokens, and the sender process killed inside a round
about two thirds through: what was in flight must fail, not hang.

Each part prints intact / failed / stuck / leaked. A life is stuck when it is not
finished once every source was delivered and the loop ran out of steps (counted in
steps, never seconds: the verdict does not depend on the machine's speed); leaked
counts blocks not back in the pool and anything the sender or receiver still holds.
Exit 1 when anything is stuck or leaked, or a Success is not bit-exact; 2 on bad flags.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from _flags import count  # benchmarks/ is on sys.path as the script's dir

from resumekit.allocator import BlockAllocator, BlockBuffers, EmbeddingTensors
from resumekit.errors import LeakError, TransportError
from resumekit.protocol import EmbeddingSender, ResumableReceiver
from resumekit.sim.twoprocess import PairConfig, Request, run_pair
from resumekit.transports.inprocess import InProcessTransport

STALL_STEPS = 5000  # steps with nothing admitted, fed or finished: the rest is stuck


@dataclass
class Tally:
    intact: int = 0
    failed: int = 0
    stuck: int = 0
    leaked: int = 0
    corrupt: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not (self.stuck or self.leaked or self.corrupt)

    def line(self, name: str) -> str:
        text = (
            f"{name}: intact {self.intact}, failed {self.failed}, stuck {self.stuck}, "
            f"leaked {self.leaked}"
        )
        if self.corrupt:
            text += f", CORRUPT {self.corrupt}"
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass
class _Life:
    rid: int
    tokens: int
    seed: int
    named: bool
    abort_after: int | None  # steps after admission; None: never aborted
    delay: int  # steps after admission before the source may be delivered
    incarnation: int = 0
    admitted_at: int = 0
    aborted: bool = False


def _source(life: _Life, hidden: int) -> EmbeddingTensors:
    return EmbeddingTensors.random(life.tokens, hidden, seed=life.seed)


def _draw(rng: random.Random, requests: int, ids: int, pool_tokens: int) -> deque[_Life]:
    """The lives, in arrival order: sizes, ids, naming, aborts and delays at random."""
    todo: deque[_Life] = deque()
    for i in range(requests):
        tokens = rng.choice([rng.randint(1, 8192), rng.randint(1, 40_000)])
        if rng.random() < 0.05:
            tokens = rng.randint(pool_tokens, 2 * pool_tokens)  # larger than the pool
        aborted = rng.random() < 0.1
        todo.append(
            _Life(
                rid=rng.randrange(ids),
                tokens=tokens,
                seed=i,
                named=rng.random() < 0.5,
                abort_after=rng.randint(0, 30) if aborted else None,
                delay=rng.choice([0, 0, 1, 3, 10, 40]),
            )
        )
    return todo


class _Engine:
    """The engine's loop over one receiver and one sender joined in process."""

    def __init__(
        self,
        todo: deque[_Life],
        rng: random.Random,
        buffers: BlockBuffers,
        live: int,
        sender_type: type[EmbeddingSender],
    ) -> None:
        self.todo, self.rng, self.live = todo, rng, live
        self.hidden = buffers.hidden_size
        self.transport = InProcessTransport(buffers)
        self.receiver = ResumableReceiver(buffers, self.transport, 8192)
        self.sender = sender_type(self.transport)
        self.running: dict[int, _Life] = {}  # rid -> its life in the receiver
        self.sources: dict[int, deque[_Life]] = {}  # rid -> lives whose source is to come
        self.waiting: deque[_Life] = deque()  # drawn lives whose id is still in use
        self.step = 0
        self.progress = 0  # the last step at which a life was admitted, fed or ended
        self.tally = Tally()

    def busy(self) -> bool:
        return bool(self.todo or self.waiting or self.running or any(self.sources.values()))

    def admit(self) -> None:
        """Up to ``live`` lives; an id again only once its earlier life was taken."""
        for _ in range(len(self.waiting)):
            life = self.waiting.popleft()
            if life.rid in self.running or len(self.running) >= self.live:
                self.waiting.append(life)
            else:
                self._add(life)
        while self.todo and len(self.running) < self.live:
            life = self.todo.popleft()
            if life.rid in self.running:
                self.waiting.append(life)
            else:
                self._add(life)

    def _add(self, life: _Life) -> None:
        life.incarnation = self.receiver.add(life.rid)
        life.admitted_at = self.progress = self.step
        self.running[life.rid] = life
        self.sources.setdefault(life.rid, deque()).append(life)

    def encode(self) -> None:
        """Each id's next source once its delay has passed, in life order."""
        for rid, queue in self.sources.items():
            if queue and self.step - queue[0].admitted_at >= queue[0].delay:
                life = queue.popleft()
                inc = life.incarnation if life.named else None
                self.sender.add(rid, _source(life, self.hidden), incarnation=inc)
                self.progress = self.step

    def disturb(self) -> None:
        """Aborts when due; statuses held back now and then."""
        for life in list(self.running.values()):
            if life.abort_after is not None and self.step - life.admitted_at == life.abort_after:
                life.aborted = self.receiver.abort(life.rid)
        if self.rng.random() < 0.02:
            self.transport.hold()
        elif self.transport.held and self.rng.random() < 0.3:
            self.transport.release()

    def finish(self) -> None:
        """Take what finished; a Success must be bit-exact."""
        for rid in self.receiver.step():
            life = self.running.pop(rid)  # type: ignore[call-overload]
            self.progress = self.step
            result = self.receiver.take(rid)
            if not result.ok:
                self.tally.failed += 1
            elif result.output is not None and result.output.equal(_source(life, self.hidden)):
                self.tally.intact += 1
            else:
                self.tally.corrupt += 1

    def judge(self) -> Tally:
        """After the loop: stuck and leaked, with what still holds what."""
        self.transport.release()
        for _ in range(1000):  # late answers to cancels release the quarantine
            self.sender.step()
            self.receiver.step()
        tally = self.tally
        tally.stuck = len(self.running) + len(self.waiting) + len(self.todo)
        allocator = self.receiver.allocator
        tally.leaked = allocator.num_blocks - allocator.num_free_blocks
        problems = []
        for end in (self.receiver, self.sender):
            try:
                end.check_quiescent()
            except LeakError as error:
                problems.append(str(error)[:200])
        if tally.stuck:
            problems.append(f"stuck ids {sorted(self.running)[:8]} after {self.step} steps")
        if problems and not tally.leaked and not tally.stuck:
            tally.leaked = 1  # something is held that is not a block
        tally.detail = "; ".join(problems)
        return tally


def soak_in_process(
    requests: int,
    ids: int,
    *,
    seed: int = 0,
    pool_blocks: int = 512,
    block_size: int = 128,
    hidden: int = 8,
    live: int = 24,
    sender_type: type[EmbeddingSender] = EmbeddingSender,
) -> Tally:
    """The in-process soak; ``sender_type`` lets a test plant a bug and see it counted."""
    rng = random.Random(seed)
    buffers = BlockBuffers(BlockAllocator(pool_blocks, block_size), hidden, device="cpu")
    todo = _draw(rng, requests, ids, pool_blocks * block_size)
    engine = _Engine(todo, rng, buffers, live, sender_type)
    # A life needs at most a few hundred steps once its source is in: far more than enough.
    limit = 400 * requests + 10_000
    while engine.step < limit and engine.busy():
        engine.step += 1
        if engine.step - engine.progress > STALL_STEPS:
            break  # nothing moved for that long: what is left is stuck
        engine.admit()
        engine.encode()
        engine.disturb()
        engine.sender.step()
        engine.finish()
    return engine.judge()


def soak_mooncake(requests: int, max_tokens: int, *, seed: int = 0) -> Tally:
    """``requests`` over Mooncake in two processes; the sender dies two thirds through."""
    rng = random.Random(seed)
    block_size, pool_blocks = 128, 1024
    sizes = [rng.randint(1, max_tokens) for _ in range(requests)]
    # The fewest rounds the sender can write: round 0 takes 8192 tokens, each resume at
    # most the whole pool. Killing it inside round 2/3 of that always lands mid-run; an
    # estimate of 8192 tokens a round was often more rounds than an idle machine wrote,
    # and the sender finished before its kill (seen in CI: 30 intact, 0 failed).
    pool_tokens = pool_blocks * block_size
    rounds = sum(1 if t <= 8192 else 1 + -(-(t - 8192) // pool_tokens) for t in sizes)
    cfg = PairConfig(
        [Request(i, t, seed=i) for i, t in enumerate(sizes)],
        pool_blocks,
        block_size,
        hidden=8,
        timeout=10.0,
        deadline=900.0,
        fault_round=max(1, 2 * rounds // 3),
        transport="mooncake",
    )
    tally = Tally()
    try:
        report = run_pair(cfg)
    except TransportError as error:  # a process hung past its deadline, or failed
        tally.stuck = requests
        tally.detail = str(error)
        return tally
    for o in report.outcomes:
        if o.state == "Success":
            if o.intact:
                tally.intact += 1
            else:
                tally.corrupt += 1
        elif o.state == "Failed":
            tally.failed += 1
        else:
            tally.stuck += 1
    tally.leaked = report.leaked_blocks + report.quarantined + report.records_left
    tally.detail = f"sender exit {report.sender_exit}, {report.seconds:.0f}s"
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=count(0), default=2000, help="in-process lives")
    parser.add_argument("--ids", type=count(1), default=300, help="request ids they share")
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument("--mooncake-requests", type=count(0), default=200)
    parser.add_argument("--mooncake-tokens", type=count(1, 2**31 - 1), default=200_000)
    args = parser.parse_args(argv)
    if not args.requests and not args.mooncake_requests:
        parser.error("nothing to soak: --requests and --mooncake-requests are both 0")
    torch.set_num_threads(1)  # small copies: intra-op threads only slow them
    ok = True
    if args.requests:
        tally = soak_in_process(args.requests, args.ids, seed=args.seed)
        print(tally.line(f"in process, {args.requests} lives over {args.ids} ids"))
        ok = ok and tally.ok
    if args.mooncake_requests:
        tally = soak_mooncake(args.mooncake_requests, args.mooncake_tokens, seed=args.seed)
        print(tally.line(f"mooncake, {args.mooncake_requests} requests, sender killed"))
        ok = ok and tally.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
