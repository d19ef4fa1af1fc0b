"""worker/claims.py against a real PostgreSQL server (tests/pgserver.py): claims, leases, takeovers.

Every test gets a fresh database on one throw-away server per module. Without the PostgreSQL binaries the
tests skip with the reason; under CI (CI=true) they fail instead.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import statements_of
from pgserver import allow, fresh_database, postgres_server, refuse

from worker.claims import Claims, drop_key
from worker.exceptions import StoreError
from worker.store import ResultRecord, Store
from worker.store import claims as claims_table
from worker.store import results as results_table

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
def store(pg_server: str) -> Iterator[Store]:
    with Store(fresh_database(pg_server), retry_s=5) as opened:
        yield opened


def keys(*names: str) -> dict[str, str]:
    """{drop key: name} for files of 100 bytes with mtime 1 s, inode 7."""
    return {drop_key(name, 100, 1_000_000_000, 7): name for name in names}


def record(name: str, claims: Claims, key: str, sha: str) -> ResultRecord:
    return ResultRecord(file=name, location=f"/inbox/{name}", status="ok", model_id="m" * 64, model_name="tiny",
                        worker=claims.worker_id, host=claims.host, sha256=sha, category="red", confidence=0.9,
                        claim_key=key)


def claim_rows(store: Store) -> dict[str, tuple]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(claims_table.c.file, claims_table.c.worker_id, claims_table.c.result_id,
                                      claims_table.c.done_at.is_not(None), claims_table.c.takeovers))
        return {row[0]: tuple(row[1:]) for row in rows}


def result_rows(store: Store) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT file, worker, host FROM results ORDER BY id"))]


# ---------------------------------------------------------------------------------------------------------
def test_drop_key_depends_on_name_size_mtime_and_inode_only() -> None:
    base = drop_key("shoes/a.jpg", 100, 5, 9)
    assert base == drop_key("shoes/a.jpg", 100, 5, 9) and len(base) == 64
    assert len({base, drop_key("shoes/b.jpg", 100, 5, 9), drop_key("shoes/a.jpg", 101, 5, 9),
                drop_key("shoes/a.jpg", 100, 6, 9), drop_key("shoes/a.jpg", 100, 5, 10)}) == 5
    assert drop_key("caf\udce9.jpg", 1, 1, 1) != drop_key("café.jpg", 1, 1, 1)  # undecodable names work too


def test_claims_need_postgresql(tmp_path) -> None:
    with Store(f"sqlite:///{tmp_path / 'r.db'}") as sqlite_store, pytest.raises(StoreError, match="need PostgreSQL"):
        Claims(sqlite_store, "w", "h")


def test_two_claimants_each_drop_goes_to_exactly_one(store: Store) -> None:
    a = Claims(store, "a", "host-a", lease_s=30)
    b = Claims(store, "b", "host-b", lease_s=30)
    first = a.claim(keys("1.jpg", "2.jpg"))
    assert set(first.granted) == set(keys("1.jpg", "2.jpg")) and not first.held
    second = b.claim(keys("2.jpg", "3.jpg"))
    (k2,), (k3,) = keys("2.jpg"), keys("3.jpg")
    assert set(second.granted) == {k3}
    held = second.held[k2]
    assert (held.worker_id, held.host, held.done) == ("a", "host-a", False)
    assert 25 < held.retry_in_s <= 30  # by the database clock: until a's lease ends
    assert (a.held, b.held) == (2, 1)
    assert claim_rows(store) == {"1.jpg": ("a", None, False, 0), "2.jpg": ("a", None, False, 0),
                                 "3.jpg": ("b", None, False, 0)}


@pytest.mark.timeout(60)
def test_many_claimants_racing_on_the_same_drops_never_share_one(store: Store) -> None:
    drops = keys(*[f"{i}.jpg" for i in range(300)])
    claimants = [Claims(store, f"w{i}", "host", lease_s=30) for i in range(4)]
    won: dict[str, set[str]] = {}
    start = threading.Barrier(len(claimants))

    def race(claims: Claims) -> None:
        start.wait()
        mine: set[str] = set()
        names = sorted(drops)
        random.Random(claims.worker_id).shuffle(names)  # each in its own order: real contention
        for offset in range(0, len(names), 16):  # batch by batch, as the pipeline claims
            mine.update(claims.claim({k: drops[k] for k in names[offset:offset + 16]}).granted)
        won[claims.worker_id] = mine

    threads = [threading.Thread(target=race, args=(c,)) for c in claimants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert sorted(won) == ["w0", "w1", "w2", "w3"]  # every claimant finished (one that raised has no entry)
    assert sum(len(mine) for mine in won.values()) == len(drops)  # none granted twice…
    assert set().union(*won.values()) == set(drops)  # …and none lost
    print("drops won per claimant:", {w: len(m) for w, m in sorted(won.items())})


@pytest.mark.timeout(30)
def test_lapsed_lease_is_taken_over_and_the_old_holder_cannot_commit(store: Store) -> None:
    a = Claims(store, "a", "host-a", lease_s=0.5)  # never renewed: a stalled or dead worker
    b = Claims(store, "b", "host-b", lease_s=30)
    (key, name), = keys("x.jpg").items()
    assert key in a.claim({key: name}).granted
    assert key in b.claim({key: name}).held
    time.sleep(0.7)
    granted = b.claim({key: name}).granted[key]
    assert (granted.taken_over, granted.result_id) == (True, None)
    assert b.takeovers == 1
    # a wakes up and tries to record: its claim is gone, nothing is written for it.
    assert store.add_results([record(name, a, key, "s" * 64)], claims=a) == [None]
    assert a.held == 0
    (row_id,) = store.add_results([record(name, b, key, "s" * 64)], claims=b)
    assert row_id is not None
    assert result_rows(store) == [("x.jpg", "b", "host-b")]
    assert claim_rows(store) == {"x.jpg": ("b", row_id, False, 1)}


@pytest.mark.timeout(30)
def test_renewal_keeps_a_claim_past_its_lease(store: Store) -> None:
    a = Claims(store, "a", "host-a", lease_s=1.5)  # renewal has a second of slack on a busy machine
    b = Claims(store, "b", "host-b", lease_s=30)
    (key, name), = keys("x.jpg").items()
    a.claim({key: name})
    a.start()  # renews every 0.5 s
    try:
        deadline = time.monotonic() + 4.0  # well past the lease
        while time.monotonic() < deadline:
            assert key in b.claim({key: name}).held
            time.sleep(0.1)
    finally:
        a.close()  # no row yet: the claim is deleted, free at once
    granted = b.claim({key: name}).granted[key]
    assert (granted.taken_over, granted.result_id) == (False, None)


@pytest.mark.timeout(30)
def test_a_recorded_claim_taken_over_carries_its_row(store: Store) -> None:
    """The holder committed the drop's row and died before moving the file: whoever takes the claim over
    learns the row id, so it only moves the file (whatever path it sees the file under)."""
    a = Claims(store, "a", "host-a", lease_s=0.5)
    b = Claims(store, "b", "host-b", lease_s=30)
    (key, name), = keys("x.jpg").items()
    a.claim({key: name})
    (row_id,) = store.add_results([record(name, a, key, "s" * 64)], claims=a)
    assert key in b.claim({key: name}).held  # recording renewed a's lease
    time.sleep(0.7)
    granted = b.claim({key: name}).granted[key]
    assert (granted.taken_over, granted.result_id) == (True, row_id)
    b.release([key])
    assert claim_rows(store) == {}


def test_close_deletes_unrecorded_claims_and_expires_recorded_ones_at_once(store: Store) -> None:
    a = Claims(store, "a", "host-a", lease_s=300)
    b = Claims(store, "b", "host-b", lease_s=30)
    drops = keys("recorded.jpg", "unrecorded.jpg")
    a.claim(drops)
    (k_rec, k_unrec) = list(keys("recorded.jpg")) + list(keys("unrecorded.jpg"))
    (row_id,) = store.add_results([record("recorded.jpg", a, k_rec, "s" * 64)], claims=a)
    a.close()
    assert claim_rows(store) == {"recorded.jpg": ("a", row_id, False, 0)}
    outcome = b.claim(drops)  # no waiting for a's 300 s lease
    assert outcome.granted[k_rec].result_id == row_id and outcome.granted[k_rec].taken_over
    assert outcome.granted[k_unrec].result_id is None and not outcome.granted[k_unrec].taken_over


def test_a_restart_under_the_same_worker_id_takes_its_claims_over_at_once(store: Store) -> None:
    old = Claims(store, "web1", "web1", lease_s=300)  # killed: its claims would last 300 s
    new = Claims(store, "web1", "web1", lease_s=300)  # the same configured id, a new process
    assert old.owner != new.owner
    (key, name), = keys("x.jpg").items()
    old.claim({key: name})
    assert new.claim({key: name}).granted[key].taken_over
    assert store.add_results([record(name, old, key, "s" * 64)], claims=old) == [None]


def test_files_left_in_place_keep_a_done_claim_nobody_takes(store: Store) -> None:
    a = Claims(store, "a", "host-a", lease_s=0.1)
    b = Claims(store, "b", "host-b", lease_s=30)
    (key, name), = keys("x.jpg").items()
    a.claim({key: name})
    store.add_results([record(name, a, key, "s" * 64)], claims=a)
    a.release([], left=[key])
    time.sleep(0.2)  # even with the lease long gone
    held = b.claim({key: name}).held[key]
    assert (held.done, held.retry_in_s) == (True, 0.0)
    assert a.renew() == 0  # done claims are not renewed


def test_release_only_touches_this_process_claims(store: Store) -> None:
    a = Claims(store, "a", "host-a", lease_s=30)
    b = Claims(store, "b", "host-b", lease_s=30)
    (key, name), = keys("x.jpg").items()
    a.claim({key: name})
    b.release([key])
    b.close()
    assert claim_rows(store) == {"x.jpg": ("a", None, False, 0)}
    assert a.renew() == 1


def test_claims_lapsed_long_ago_are_purged(store: Store) -> None:
    dead = Claims(store, "dead", "host-a", lease_s=0.1)
    live = Claims(store, "live", "host-b", lease_s=30)
    dead.claim(keys("moved-before-the-death.jpg"))
    live.claim(keys("in-progress.jpg"))
    time.sleep(0.3)
    assert live.purge_lapsed(older_than_s=0.1) == 1
    assert claim_rows(store) == {"in-progress.jpg": ("live", None, False, 0)}


def test_a_release_the_database_refuses_is_retried_until_it_goes_through(store: Store) -> None:
    a = Claims(store, "a", "host-a", lease_s=0.6)
    names = keys("moved.jpg", "left.jpg")
    a.claim(names)
    moved, left = sorted(names, key=names.__getitem__, reverse=True)
    refuse(store.engine, "DELETE", "claims")
    refuse(store.engine, "UPDATE", "claims")
    a.release_later([moved], left=[left])  # refused: kept for later
    assert set(claim_rows(store)) == {"moved.jpg", "left.jpg"}
    assert a.flush_releases() is False
    allow(store.engine, "DELETE", "claims")
    allow(store.engine, "UPDATE", "claims")
    a.start()  # the renewal thread retries first
    try:
        deadline = time.monotonic() + 5
        while claim_rows(store) != {"left.jpg": ("a", None, True, 0)}:
            assert time.monotonic() < deadline, claim_rows(store)
            time.sleep(0.05)
    finally:
        a.close()
    assert a.flush_releases() is True


def test_a_file_under_a_key_whose_release_is_pending_is_a_new_drop(store: Store) -> None:
    """`cp -p` of a photo this worker recorded and moved, while the database refused that release: the same
    name, size and mtime, so the same key, but a new drop. It must get a row of its own, not be taken
    for the recorded one and only moved."""
    a = Claims(store, "a", "host-a", lease_s=30)
    (key, name), = keys("again.jpg").items()
    a.claim({key: name})
    (row_id,) = store.add_results([record(name, a, key, "s" * 64)], claims=a)
    refuse(store.engine, "DELETE", "claims")
    a.release_later([key])  # moved away; the release waits for the database
    assert a.flush_releases() is False
    granted = a.claim({key: name}).granted[key]  # the copy arrives
    assert row_id is not None and granted.result_id is None
    allow(store.engine, "DELETE", "claims")
    assert a.flush_releases() is True  # nothing left to release: the key is held again, for the copy
    assert claim_rows(store) == {"again.jpg": ("a", row_id, False, 0)}
    assert a.renew() == 1


def test_with_claims_a_record_without_a_claim_is_not_written(store: Store) -> None:
    # A record that reached the store without a claim (a bug upstream) must not become a row another
    # worker is not kept from writing too: it is answered like one whose claim was lost.
    a = Claims(store, "a", "host-a", lease_s=30)
    (key, name), = keys("x.jpg").items()
    a.claim({key: name})
    unclaimed = record("y.jpg", a, key, "u" * 64)
    unclaimed.claim_key = None
    ids = store.add_results([record(name, a, key, "s" * 64), unclaimed], claims=a)
    assert ids[0] is not None and ids[1] is None
    assert result_rows(store) == [("x.jpg", "a", "host-a")]


def test_a_batch_of_claims_takes_the_same_statements_whatever_its_size(store: Store) -> None:
    """Claiming (free drops, taken-over ones, held ones), checking at commit, marking recorded and releasing
    2 or 200 drops sends the same statement texts (the keys travel as arrays): SQLAlchemy compiles each
    once and psycopg converts it once, where an INSERT with a VALUES list was compiled again for every
    batch (15 ms of a batch of 64)."""
    a = Claims(store, "a", "host-a", lease_s=30)
    b = Claims(store, "b", "host-b", lease_s=30)
    sent = []
    for size in (2, 200):
        drops = keys(*[f"{size}-{i}.jpg" for i in range(size)])
        held_by_b = dict(list(drops.items())[: size // 2])  # b's lease lapses on the first half: a takes it
        b.claim(held_by_b)
        with store.engine.begin() as conn:
            conn.execute(claims_table.update().where(claims_table.c.drop_key.in_(list(held_by_b)))
                         .values(lease_until=sa.func.now() - timedelta(seconds=1)))
        also_held = keys(f"{size}-held.jpg")
        b.claim(also_held)  # live: a learns who holds it
        batch = [record(name, a, key, f"{size:04d}{i:04d}".ljust(64, "0"))
                 for i, (key, name) in enumerate(drops.items())]
        with statements_of(store) as statements:
            outcome = a.claim({**drops, **also_held})
            ids = store.add_results(batch, claims=a)
        recorded = {name: row[1] for name, row in claim_rows(store).items() if name in drops.values()}
        with statements_of(store) as releasing:
            store.set_locations([(i, f"/processed/{r.file}") for i, r in zip(ids, batch, strict=True)],
                                also=lambda conn, drops=drops: a.release_in(conn, list(drops)))
        sent.append(statements + releasing)
        assert set(outcome.granted) == set(drops) and set(outcome.held) == set(also_held)
        assert sum(g.taken_over for g in outcome.granted.values()) == size // 2
        with store.engine.connect() as conn:  # each claim got its own drop's row
            files = dict(conn.execute(sa.select(results_table.c.id, results_table.c.file)).all())
        assert {name: files[row_id] for name, row_id in recorded.items()} == {n: n for n in drops.values()}
        assert not set(claim_rows(store)) & set(drops.values()) and a.held == 0  # b's live claim stays
    assert sent[0] == sent[1]
    assert {text.split()[0] for text in sent[1]} == {"INSERT", "UPDATE", "SELECT", "DELETE"}
