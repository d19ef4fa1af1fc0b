"""Claims: several workers sharing one PostgreSQL database agree, through it, on who classifies each drop.

Every worker watches an inbox (its own, or one shared with others over a network filesystem) and may see
the same files as others. Before it reads a file, a worker claims the file's *drop* in the `claims` table;
only the worker holding the claim reads, classifies, records and moves that file.

- **Drop key**: sha256 of (name relative to the inbox, size, mtime in ns, inode number), all known from one
  lstat before the file is read. A shared inbox gives every host the same four values (NFS serves mtime
  and the inode number, its fileid, from the server; so does SMB with the Linux client's default
  `serverino`), whatever path it is mounted at; a file rewritten in place is a new drop. The inode number
  tells apart copies with the same name, size and mtime (rsync -t, cp -p) in two *different* inboxes, or
  a re-upload with its mtime kept: without it, a claim left with a row by a worker that died after its
  move (kept up to PURGE_AFTER_S) took such a copy for the drop already recorded, which was then moved
  or deleted without a row of its own.
- **Claim** (`claim`): one transaction per batch: `INSERT … ON CONFLICT (drop_key) DO NOTHING RETURNING`
  grants the free drops (PostgreSQL's unique index decides: of several workers claiming one drop at once,
  exactly one inserts it); then `UPDATE … WHERE the lease has lapsed (or the claim is this worker id's,
  left by its previous, dead process) RETURNING` takes over the lapsed ones (row locks make it atomic);
  the others learn who holds each drop and when its lease ends, by the database clock, so that host
  clocks never matter, and look again then. Losing a race takes no lock on the winner's claim.
- **Lease**: a claim is valid until `lease_until`; a thread renews this worker's claims every third of the
  lease (`start`). A worker that dies (SIGKILL, power cut, network gone) stops renewing; one lease later
  another worker that sees the file takes the claim over and classifies it.
- **Commit check** (`lock_held` + `mark_recorded`, called by Store.add_results inside the batch's
  transaction): the claims of the batch are locked `FOR UPDATE` and checked to be still this process's.
  A drop taken over meanwhile (this worker was alive but its lease lapsed: a long stall) is not written;
  a held one gets `result_id` set in the same transaction. So a drop gets at most one row, and a worker
  that takes over a claim with a `result_id` (the holder died between commit and move) only moves the
  file, whatever path it sees it under.
- **Release** (`release_in`, in the transaction that records the files' new places): once a file is moved
  or deleted its claim is deleted; a file left in place (`files.on_success = "leave"`) keeps a claim
  marked done, so that no other worker records it again. A file that vanished or is skipped (FIFO,
  symlink…) releases its claim too (`release`).
- **Stuck** (`release_in(stuck=…)`): a file recorded here that this worker cannot move (its processed/ full
  or read-only) has its claim's lease ended and is no longer renewed; the row stays on the claim, so the
  worker that takes it over (any that can move the file, this one included on its next try) only moves it.
- **Shutdown** (`close`): claims without a row are deleted, claims with a row are expired at once, so that
  other workers take them over without waiting for the lease.
- **Purge**: a claim nobody took over within PURGE_AFTER_S of its lapse is deleted by the renewal threads,
  every PURGE_EVERY_S. Its worker died after moving the file, or between claiming a drop and finding the
  file gone: it had seen the file just before another worker recorded, moved and released it (its claim
  then came after that release). Either way no other worker ever sees that drop again.

Only PostgreSQL: SQLite has one writer anyway and keeps the per-inbox lock file (worker.lock).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from worker.exceptions import StoreError
from worker.store import Store, claims, pg_unnest, safe_text

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0
RENEWALS_PER_LEASE = 3  # a claim survives two missed renewals
PURGE_AFTER_S = 3600.0  # lapsed claims nobody took over are deleted this long after their lease ended
PURGE_EVERY_S = 300.0
# The owner of a claim handed on because its worker could not move the recorded file: no process renews it.
STUCK_OWNER = "stuck"
HANDED_ON_MEMORY = 10_000  # such claims remembered, so that taking one back is not logged as a takeover


def drop_key(file: str, size: int, mtime_ns: int, inode: int) -> str:
    """The claim key of a drop: sha256 hex of its name relative to the inbox, its size, its mtime (ns) and
    its inode number."""
    text = f"{file}\0{int(size)}\0{int(mtime_ns)}\0{int(inode)}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


# The statements of every batch, built once and each with the same text for any number of drops: the
# drops' keys travel as arrays (unnest, = ANY), so SQLAlchemy compiles each once and psycopg converts it
# once (see worker.store._PG_INSERT). Claiming 64 drops took 15 ms through an INSERT with a VALUES list.
_KEYS = sa.bindparam("keys", type_=ARRAY(sa.Text))
_CLAIM = sa.text(  # in key order (the sorted keys), as every worker inserts: no two wait for each other in a cycle
    "INSERT INTO claims (drop_key, file, worker_id, host, owner, claimed_at, lease_until, takeovers) "
    "SELECT drop_key, file, :worker_id, :host, :owner, now(), now() + :lease, 0 "
    f"FROM {pg_unnest([claims.c.drop_key, claims.c.file], 'drops')} ORDER BY n "
    "ON CONFLICT (drop_key) DO NOTHING RETURNING drop_key")
_TAKE_OVER = (  # lapsed claims, and this worker id's own from its previous, dead process
    sa.update(claims)
    .where(claims.c.drop_key == sa.any_(_KEYS), claims.c.done_at.is_(None),
           sa.or_(claims.c.lease_until < sa.func.now(), claims.c.worker_id == sa.bindparam("worker_id")))
    .values(worker_id=sa.bindparam("worker_id"), host=sa.bindparam("host"), owner=sa.bindparam("owner"),
            claimed_at=sa.func.now(), lease_until=sa.func.now() + sa.bindparam("lease", type_=sa.Interval),
            takeovers=claims.c.takeovers + sa.case(  # (the row's values before this update)
                (claims.c.owner == sa.bindparam("owner"), 0),
                ((claims.c.owner == sa.bindparam("stuck")) & (claims.c.worker_id == sa.bindparam("worker_id")), 0),
                else_=1))
    .returning(claims.c.drop_key, claims.c.result_id)
)
_HOLDERS = sa.select(  # who holds these claims, and for how long still (by the database clock)
    claims.c.drop_key, claims.c.worker_id, claims.c.host, claims.c.done_at.is_not(None),
    sa.func.greatest(sa.extract("epoch", claims.c.lease_until - sa.func.now()), 0),
).where(claims.c.drop_key == sa.any_(_KEYS))
_LOCK_HELD = (sa.select(claims.c.drop_key)
              .where(claims.c.drop_key == sa.any_(_KEYS), claims.c.owner == sa.bindparam("owner"))
              .order_by(claims.c.drop_key).with_for_update())
_MARK_RECORDED = sa.text(
    "UPDATE claims SET result_id = recorded.result_id, lease_until = now() + :lease "
    f"FROM {pg_unnest([claims.c.drop_key, claims.c.result_id], 'recorded')} "
    "WHERE claims.drop_key = recorded.drop_key AND claims.owner = :owner")
_RELEASE = sa.delete(claims).where(claims.c.drop_key == sa.any_(_KEYS), claims.c.owner == sa.bindparam("owner"))


@dataclass(frozen=True)
class Granted:
    """A claim this worker now holds."""

    key: str
    result_id: int | None  # a row was committed by an earlier holder that died before moving the file
    taken_over: bool  # the claim was another process's (its lease lapsed, or this worker id's dead process)


@dataclass(frozen=True)
class Held:
    """A claim another worker holds."""

    key: str
    worker_id: str
    host: str
    done: bool  # recorded and left in place for good (files.on_success = "leave"): nothing to do, ever
    retry_in_s: float  # until its lease lapses, by the database clock; 0 when it was released meanwhile


@dataclass
class ClaimOutcome:
    granted: dict[str, Granted] = field(default_factory=dict)
    held: dict[str, Held] = field(default_factory=dict)


class Claims:
    """This worker process's claims in a PostgreSQL database (see the module docstring).

    Thread-safe: `claim` runs in the pipeline's batching thread, `lock_held`/`mark_recorded` inside
    Store.add_results in the main thread, `renew` in the renewal thread.
    """

    def __init__(self, store: Store, worker_id: str, host: str, *, lease_s: float = DEFAULT_LEASE_S,
                 owner: str | None = None) -> None:
        if store.dialect != "postgresql":
            raise StoreError(f"claims need PostgreSQL; database {store.url} is {store.dialect}")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s!r}")
        self.store = store
        self.worker_id = worker_id
        self.host = host
        self.lease_s = float(lease_s)
        self.owner = owner or secrets.token_hex(16)  # this process; a restart under the same id is another
        self.takeovers = 0  # claims taken over from other processes
        self._lease = timedelta(seconds=self.lease_s)
        self._mine: set[str] = set()  # keys granted and not released (for takeover detection and counts)
        self._handed_on: set[str] = set()  # keys of files this process recorded but could not move (stuck)
        # Releases the database refused (see release_later): drops finished here, and drops left in place.
        self._unreleased_finished: set[str] = set()
        self._unreleased_left: set[str] = set()
        self._releasing = threading.Lock()  # a retried release and a claim of the same keys never overlap
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _me(self) -> dict[str, str | None]:
        """This process's parameters of the claim and takeover statements."""
        return {"worker_id": self.worker_id, "host": safe_text(self.host), "owner": self.owner}

    @property
    def held(self) -> int:
        """Claims this process holds (granted, not yet released)."""
        with self._lock:
            return len(self._mine)

    # Claiming ---------------------------------------------------------------------------------------
    def claim(self, drops: Mapping[str, str]) -> ClaimOutcome:
        """Claim the drops {key: file name relative to the inbox} in one transaction.

        Granted: free keys, keys whose lease lapsed, and keys held by this worker id (its own, or its
        previous process's). Held: the others, with their holder and when to look again. StoreError when
        the database keeps failing (Store retry rules).
        """
        keys = sorted(drops)
        if not keys:
            return ClaimOutcome()
        finished: set[str] = set()  # finished here, release still pending: a file under such a key is a new drop

        def body(conn: Connection) -> ClaimOutcome:
            outcome = ClaimOutcome()
            # 1. Free drops: inserted. A drop claimed by someone else is skipped without locking its row, so
            #    a worker losing the race never makes the winner's commit wait.
            fresh = conn.execute(_CLAIM, {"drop_key": keys, "file": [safe_text(drops[key]) for key in keys],
                                          **self._me(), "lease": self._lease})
            for key in fresh.scalars():
                outcome.granted[key] = Granted(key, None, False)
            # 2. Lapsed claims, and this worker id's own (from its previous, dead process): taken over.
            rest = [key for key in keys if key not in outcome.granted]
            if rest:
                takeover = conn.execute(_TAKE_OVER, {"keys": rest, **self._me(), "lease": self._lease,
                                                     "stuck": STUCK_OWNER})
                with self._lock:
                    for key, result_id in takeover:
                        recorded = None if result_id is None or key in finished else int(result_id)
                        # (A claim handed on here that another worker took and handed on in turn is not
                        # counted as a takeover when this worker takes it back: a log line and a count.)
                        taken = key not in self._mine and key not in self._handed_on
                        outcome.granted[key] = Granted(key, recorded, taken)
            # 3. The rest are held by live workers (or done): who, and when to look again.
            others = [key for key in rest if key not in outcome.granted]
            if others:
                for key, worker_id, host, done, retry_in in conn.execute(_HOLDERS, {"keys": others}):
                    outcome.held[key] = Held(key, worker_id, host, bool(done), 0.0 if done else float(retry_in))
                for key in others:  # released between the statements: free to claim again at once
                    outcome.held.setdefault(key, Held(key, "", "", False, 0.0))
            return outcome

        with self._releasing:  # not while a pending release of one of these keys is under way
            with self._lock:
                finished = self._unreleased_finished & set(keys)
            outcome = self.store.write(f"claiming {len(keys)} files", body)
        taken = [g for g in outcome.granted.values() if g.taken_over]
        with self._lock:
            self._unreleased_finished.difference_update(outcome.granted)  # held again, for the new drop
            self._handed_on.difference_update(outcome.granted)
            self._mine.update(outcome.granted)
            self.takeovers += len(taken)
        if taken:
            log.info("took over %d files from workers whose lease lapsed (%d of them already recorded: "
                     "only moved now)", len(taken), sum(g.result_id is not None for g in taken))
        return outcome

    def lock_held(self, conn: Connection, keys: Iterable[str]) -> set[str]:
        """Inside a write transaction: lock these claims (FOR UPDATE, in key order) and return those this
        process still holds. A lapsed lease still counts as held unless another worker took it over: the
        lock makes a takeover wait for this transaction, and mark_recorded renews the lease."""
        wanted = sorted(set(keys))
        if not wanted:
            return set()
        held = set(conn.execute(_LOCK_HELD, {"keys": wanted, "owner": self.owner}).scalars())
        lost = len(wanted) - len(held)
        if lost:
            log.warning("%d claims were taken over by another worker (this worker's lease lapsed); "
                        "their results are left to it (looked at again once its lease ends)", lost)
            with self._lock:
                self._mine.difference_update(set(wanted) - held)
        return held

    def mark_recorded(self, conn: Connection, result_ids: Mapping[str, int]) -> None:
        """Inside the transaction that wrote the rows: remember each drop's row on its claim, renew it."""
        if not result_ids:
            return
        conn.execute(_MARK_RECORDED, {"drop_key": list(result_ids), "result_id": list(result_ids.values()),
                                      "owner": self.owner, "lease": self._lease})

    # Releasing --------------------------------------------------------------------------------------
    def release(self, keys: Iterable[str], *, left: Iterable[str] = ()) -> None:
        """The drops `keys` are finished here (moved, deleted, vanished or skipped): delete their claims.
        The drops `left` were recorded and left in place (files.on_success = "leave"): mark their claims
        done, so that no worker records them again while they stay unchanged. One transaction."""
        self.store.write("releasing claims", lambda conn: self.release_in(conn, keys, left=left))

    def release_later(self, keys: Iterable[str], *, left: Iterable[str] = ()) -> None:
        """`release` in the renewal thread, before each renewal until the database takes it (else these
        claims would be renewed, and their files deferred by other workers, until a restart). For a caller
        whose own write to the database just failed: it does not block on the database a second time."""
        with self._lock:
            self._unreleased_finished.update(keys)
            self._unreleased_left.update(left)

    def flush_releases(self) -> bool:
        """Retry the releases that failed (see `release_later`); True when none is left. Errors are logged."""
        with self._releasing:
            with self._lock:
                finished, kept = set(self._unreleased_finished), set(self._unreleased_left)
            if not finished and not kept:
                return True
            try:
                self.release(finished, left=kept)
            except StoreError as exc:
                log.warning("cannot release %d claims yet (retried with each renewal): %s",
                            len(finished | kept), exc)
                return False
            with self._lock:
                self._unreleased_finished.difference_update(finished)
                self._unreleased_left.difference_update(kept)
            return True

    def release_in(self, conn: Connection, keys: Iterable[str], *, left: Iterable[str] = (),
                   stuck: Iterable[str] = ()) -> None:
        """`release` inside the caller's transaction (the pipeline's set_locations). `stuck`: drops recorded
        here that this worker cannot move (its processed/ full or read-only): their claims keep the row but
        end their lease now and are no longer renewed, so that any worker that can move them takes them
        over (this one too, when it tries again)."""
        finished, kept, handed_on = sorted(set(keys)), sorted(set(left)), sorted(set(stuck))
        if handed_on:
            conn.execute(sa.update(claims).where(claims.c.drop_key.in_(handed_on), claims.c.owner == self.owner,
                                                 claims.c.done_at.is_(None))
                         .values(owner=STUCK_OWNER, lease_until=sa.func.now()))
        if finished:
            conn.execute(_RELEASE, {"keys": finished, "owner": self.owner})
        if kept:
            conn.execute(sa.update(claims).where(claims.c.drop_key.in_(kept), claims.c.owner == self.owner)
                         .values(done_at=sa.func.now()))
        with self._lock:
            self._mine.difference_update(finished)
            self._mine.difference_update(kept)
            self._mine.difference_update(handed_on)
            if len(self._handed_on) > HANDED_ON_MEMORY:  # moved by others meanwhile: forget, only a log line
                self._handed_on.clear()
            self._handed_on.update(handed_on)

    def renew(self) -> int:
        """Extend the lease of every claim this process holds; return how many."""
        mine = (sa.select(claims.c.drop_key)
                .where(claims.c.owner == self.owner, claims.c.done_at.is_(None))
                .order_by(claims.c.drop_key).with_for_update())
        statement = (sa.update(claims).where(claims.c.drop_key.in_(mine.scalar_subquery()))
                     .values(lease_until=sa.func.now() + self._lease))
        return int(self.store.write("renewing claims", lambda conn: conn.execute(statement).rowcount))

    def purge_lapsed(self, older_than_s: float = PURGE_AFTER_S) -> int:
        """Delete claims (of any worker) whose lease ended more than `older_than_s` ago; return how many.
        They belong to workers that died, and no worker has seen their files since: the files were moved
        before the death (a claim with a row), or were never recorded (a claim without one is free anyway)."""
        statement = sa.delete(claims).where(
            claims.c.done_at.is_(None), claims.c.lease_until < sa.func.now() - timedelta(seconds=older_than_s))
        count = int(self.store.write("purging lapsed claims", lambda conn: conn.execute(statement).rowcount))
        if count:
            log.info("purged %d claims that lapsed over %g s ago", count, older_than_s)
        return count

    # The renewal thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Renew this process's claims every lease / RENEWALS_PER_LEASE seconds in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name="claims", daemon=True)
            self._thread.start()

    def _renew_loop(self) -> None:
        interval = self.lease_s / RENEWALS_PER_LEASE
        next_purge = time.monotonic() + PURGE_EVERY_S
        while not self._stop.wait(interval):
            try:
                self.flush_releases()
                self.renew()
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + PURGE_EVERY_S
                    self.purge_lapsed()
            except StoreError as exc:
                log.warning("cannot renew this worker's claims (they lapse %g s after the last renewal): %s",
                            self.lease_s, exc)
            except Exception:  # a bug must not end the renewals silently
                log.exception("unexpected error renewing claims")

    def close(self) -> None:
        """Stop renewing; delete the claims without a row and expire those with one at once, so that other
        workers take them over without waiting for the lease. Errors are logged: the leases lapse anyway."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

        def body(conn: Connection) -> None:
            conn.execute(sa.delete(claims).where(claims.c.owner == self.owner, claims.c.result_id.is_(None),
                                                 claims.c.done_at.is_(None)))
            conn.execute(sa.update(claims).where(claims.c.owner == self.owner, claims.c.done_at.is_(None))
                         .values(lease_until=sa.func.now()))

        try:
            self.store.write("giving back claims", body)
        except StoreError as exc:
            log.warning("cannot give back this worker's claims (they lapse within %g s): %s", self.lease_s, exc)
        with self._lock:
            self._mine.clear()
