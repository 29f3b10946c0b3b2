"""UnitOfWork: commit, rollback (also on cancellation), savepoints, misuse, retries."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alchemium import (
    DeadlockDetected,
    SerializationFailure,
    UniqueViolation,
    UnitOfWork,
    UnitOfWorkError,
    run_in_transaction,
)
from alchemium.events import flush_delivery_marks
from tests.conftest import make_engine
from tests.events.relay_support import eventually
from tests.models import User, UserRepository

Factory = async_sessionmaker[AsyncSession]
pytestmark = pytest.mark.usefixtures("both_commit_paths")


async def user_names(factory: Factory) -> list[str]:
    async with factory() as session:
        return list((await session.scalars(select(User.name).order_by(User.name))).all())


@pytest.fixture
async def pooled(engine: AsyncEngine, db_url: str) -> AsyncIterator[AsyncEngine]:
    """A second engine on the test database with a real pool of 10 connections."""
    eng = make_engine(db_url, pool_size=10, max_overflow=0, pool_timeout=30)
    yield eng
    await eng.dispose()


# -- commit and rollback ------------------------------------------------------------------


async def test_clean_exit_commits(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
    assert await user_names(session_factory) == ["Alice"]


async def test_flush_makes_generated_values_visible(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice"})
        assert user.id is None
        await uow.flush()
        assert user.id is not None
        seen = await uow.session.scalar(select(User.id).where(User.name == "Alice"))
        assert seen == user.id


async def test_exception_rolls_back_and_propagates(session_factory: Factory) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create(uow.session, {"name": "Alice"})
            await uow.flush()
            raise RuntimeError("boom")
    assert await user_names(session_factory) == []


async def test_explicit_commit_and_rollback(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "kept"})
        await uow.commit()
        await UserRepository.create(uow.session, {"name": "discarded"})
        await uow.flush()
        await uow.rollback()
        await UserRepository.create(uow.session, {"name": "after"})
    assert await user_names(session_factory) == ["after", "kept"]


async def test_exception_after_explicit_commit_keeps_the_committed_part(
    session_factory: Factory,
) -> None:
    with pytest.raises(LookupError):
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create(uow.session, {"name": "kept"})
            await uow.commit()
            await UserRepository.create(uow.session, {"name": "lost"})
            raise LookupError
    assert await user_names(session_factory) == ["kept"]


async def test_session_is_closed_after_the_block(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        session = uow.session
        await UserRepository.create(session, {"name": "Alice"})
    assert not session.in_transaction()
    assert list(session) == []


# -- misuse -------------------------------------------------------------------------------


async def test_session_before_and_after_the_block_raises(session_factory: Factory) -> None:
    uow = UnitOfWork(session_factory)
    with pytest.raises(UnitOfWorkError, match="before entering"):
        _ = uow.session
    async with uow:
        assert isinstance(uow.session, AsyncSession)
    with pytest.raises(UnitOfWorkError, match="after leaving"):
        _ = uow.session
    with pytest.raises(UnitOfWorkError):
        await uow.flush()
    with pytest.raises(UnitOfWorkError):
        await uow.commit()


async def test_entering_twice_raises(session_factory: Factory) -> None:
    uow = UnitOfWork(session_factory)
    async with uow:
        await UserRepository.create(uow.session, {"name": "inner-ok"})
        with pytest.raises(UnitOfWorkError, match="already entered"):
            async with uow:
                pass  # pragma: no cover
        # the outer block is unaffected by the refused re-entry
        await UserRepository.create(uow.session, {"name": "still-ok"})
    with pytest.raises(UnitOfWorkError, match="already entered"):
        async with uow:
            pass  # pragma: no cover
    assert await user_names(session_factory) == ["inner-ok", "still-ok"]


# -- savepoints ---------------------------------------------------------------------------


async def test_savepoint_rollback_keeps_the_outer_work(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "outer"})
        with pytest.raises(ValueError, match="inner failure"):
            async with uow.savepoint():
                await UserRepository.create(uow.session, {"name": "inner"})
                await uow.flush()
                raise ValueError("inner failure")
        async with uow.savepoint():
            await UserRepository.create(uow.session, {"name": "second"})
        await UserRepository.create(uow.session, {"name": "last"})
    assert await user_names(session_factory) == ["last", "outer", "second"]


async def test_savepoint_recovers_from_a_constraint_violation(session_factory: Factory) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create(uow.session, {"name": "Alice"})
        await uow.flush()
        with pytest.raises(UniqueViolation):
            async with uow.savepoint():
                await UserRepository.create(uow.session, {"name": "Alice"})
        # the transaction is still usable (on PostgreSQL thanks to the savepoint)
        await UserRepository.create(uow.session, {"name": "Bob"})
    assert await user_names(session_factory) == ["Alice", "Bob"]


async def test_outer_rollback_discards_a_released_savepoint(session_factory: Factory) -> None:
    with pytest.raises(RuntimeError):
        async with UnitOfWork(session_factory) as uow:
            async with uow.savepoint():
                await UserRepository.create(uow.session, {"name": "inner"})
            raise RuntimeError
    assert await user_names(session_factory) == []


# -- cancellation -------------------------------------------------------------------------


async def test_cancelled_tasks_roll_back_and_return_every_connection(
    pooled: AsyncEngine,
) -> None:
    factory = async_sessionmaker(pooled, expire_on_commit=False)
    tasks_n = 50
    in_transaction = 0
    enough = asyncio.Event()
    forever = asyncio.Event()
    is_sqlite = pooled.dialect.name == "sqlite"
    # SQLite has one writer at a time: the others would wait for the lock, not hold it.
    wanted = 1 if is_sqlite else 10

    async def worker(i: int) -> None:
        nonlocal in_transaction
        async with UnitOfWork(factory) as uow:
            await UserRepository.create(uow.session, {"name": f"w{i}"})
            await uow.flush()
            in_transaction += 1
            if in_transaction >= wanted:
                enough.set()
            await forever.wait()  # mid-transaction, holding a connection

    tasks = [asyncio.create_task(worker(i)) for i in range(tasks_n)]
    await asyncio.wait_for(enough.wait(), 30)
    await asyncio.sleep(0.05)  # let more tasks queue on the pool / the lock
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    await flush_delivery_marks()  # marks in flight hold a connection
    assert pooled.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with factory() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 0
    await flush_delivery_marks()  # marks in flight hold a connection
    assert pooled.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_cancellation_at_random_points_leaves_only_whole_units(
    pooled: AsyncEngine,
) -> None:
    """Each unit writes two rows; cancelled anywhere (even mid-commit) it commits both or none."""
    factory = async_sessionmaker(pooled, expire_on_commit=False)
    rng = random.Random(1234)

    async def worker(i: int) -> None:
        for j in range(100):
            async with UnitOfWork(factory) as uow:
                await UserRepository.create(uow.session, {"name": f"a{i}-{j}"})
                await uow.flush()
                await asyncio.sleep(0.005)  # the first row is in the transaction, not the second
                await UserRepository.create(uow.session, {"name": f"b{i}-{j}"})

    tasks = [asyncio.create_task(worker(i)) for i in range(20)]
    for task in tasks:
        await asyncio.sleep(rng.uniform(0, 0.02))
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await flush_delivery_marks()  # marks in flight hold a connection
    assert pooled.pool.checkedout() == 0  # type: ignore[attr-defined]
    names = await user_names(factory)
    firsts = {n[1:] for n in names if n.startswith("a")}
    seconds = {n[1:] for n in names if n.startswith("b")}
    assert firsts == seconds


async def test_cancellation_between_two_flushed_writes_commits_neither(
    session_factory: Factory,
) -> None:
    """A unit of work cancelled between its two flushed writes leaves neither behind."""
    between = asyncio.Event()

    async def unit() -> None:
        async with UnitOfWork(session_factory) as uow:
            await UserRepository.create(uow.session, {"name": "first"})
            await uow.flush()
            between.set()
            await asyncio.Event().wait()  # the cancellation lands here, between the writes
            await UserRepository.create(uow.session, {"name": "second"})  # pragma: no cover

    task = asyncio.create_task(unit())
    await asyncio.wait_for(between.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await user_names(session_factory) == []


# A deferred constraint trigger runs at COMMIT: this one makes every COMMIT that inserted
# a user take a second, on the server, so a cancellation can land while COMMIT runs.
SLOW_COMMIT = [
    "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER users_slow_commit AFTER INSERT ON users "
    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
]
COMMIT_RUNNING = text(
    "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
    "AND query ILIKE 'commit%' AND state = 'active' AND wait_event = 'PgSleep'"
)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_commit_in_progress_finishes_although_the_task_is_cancelled(
    engine: AsyncEngine, pooled: AsyncEngine
) -> None:
    """COMMIT is shielded: cancelled while the server runs it, it completes, then the task
    ends cancelled and its connection is back in the pool."""
    async with engine.begin() as conn:
        for statement in SLOW_COMMIT:
            await conn.execute(text(statement))
    factory = async_sessionmaker(pooled, expire_on_commit=False)

    async def unit() -> None:
        async with UnitOfWork(factory) as uow:
            await UserRepository.create(uow.session, {"name": "slow"})

    async def commit_running() -> bool:
        async with engine.connect() as conn:
            return bool(await conn.scalar(COMMIT_RUNNING))

    task = asyncio.create_task(unit())
    await eventually(commit_running, timeout=10, interval=0.02)
    task.cancel()  # the server is inside COMMIT, for about a second more
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await user_names(factory) == ["slow"]
    assert pooled.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_final_flush_blocked_on_a_lock_stays_cancellable(
    session_factory: Factory, pooled: AsyncEngine
) -> None:
    """Only the COMMIT is shielded: a timeout fires while the exit's flush waits for a lock."""
    async with UnitOfWork(session_factory) as uow:
        user = await UserRepository.create(uow.session, {"name": "Alice"})
    factory = async_sessionmaker(pooled, expire_on_commit=False)
    is_sqlite = pooled.dialect.name == "sqlite"

    async def rename() -> None:
        async with UnitOfWork(factory) as uow:
            found = await UserRepository.get(uow.session, user.id)
            assert found is not None
            UserRepository.update(found, {"name": "Bob"})  # flushed at exit, behind the lock

    async with factory() as blocker:
        await blocker.execute(
            text("UPDATE users SET name = 'Blocker' WHERE id = :id"), {"id": user.id}
        )
        task = asyncio.create_task(rename())
        await asyncio.sleep(0.5)  # the unit of work is now waiting for the row lock
        assert not task.done()
        task.cancel()
        # PostgreSQL cancels the waiting statement at once; SQLite's driver thread only
        # returns when the lock is released (the cancellation is delivered then).
        done, _ = await asyncio.wait([task], timeout=0.5 if is_sqlite else 10)
        assert is_sqlite or done, "the flush at exit did not react to cancellation"
        await blocker.rollback()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await user_names(factory) == ["Alice"]
    await flush_delivery_marks()  # marks in flight hold a connection
    assert pooled.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- isolation level and retries ----------------------------------------------------------


@pytest.fixture
def postgres_only(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("serialization failures and deadlocks are PostgreSQL behaviour")


async def test_isolation_level_applies_to_the_unit_of_work(
    session_factory: Factory, backend: str
) -> None:
    if backend != "postgresql":
        pytest.skip(
            "reads the level back with PostgreSQL's SHOW transaction_isolation; SQLite has "
            "one isolation level (serializable) for every transaction"
        )
    async with UnitOfWork(session_factory, isolation_level="SERIALIZABLE") as uow:
        level = await uow.session.scalar(text("SHOW transaction_isolation"))
    assert level == "serializable"
    async with UnitOfWork(session_factory) as uow:
        level = await uow.session.scalar(text("SHOW transaction_isolation"))
    assert level == "read committed"


async def conflicting_increments(
    factory: Factory, attempts: int
) -> tuple[list[BaseException | None], int, int]:
    """Two SERIALIZABLE read-modify-writes of the same row that really overlap."""
    async with UnitOfWork(factory) as uow:
        await UserRepository.create(uow.session, {"name": "counter", "age": 0})
    reads = 0
    both_read = asyncio.Event()
    calls = 0

    async def increment(uow: UnitOfWork) -> None:
        nonlocal reads, calls
        calls += 1
        counter = await UserRepository.get_one_or_raise(uow.session, {"name": "counter"})
        reads += 1
        if reads >= 2:
            both_read.set()
        await asyncio.wait_for(both_read.wait(), 10)  # both have read the same value
        assert counter.age is not None
        UserRepository.update(counter, {"age": counter.age + 1})

    results = await asyncio.gather(
        *(
            run_in_transaction(
                factory, increment, isolation_level="SERIALIZABLE", attempts=attempts
            )
            for _ in range(2)
        ),
        return_exceptions=True,
    )
    async with UnitOfWork(factory) as uow:
        final = await UserRepository.get_one_or_raise(uow.session, {"name": "counter"})
    assert final.age is not None
    return list(results), final.age, calls


async def test_serialization_failure_is_retried(
    session_factory: Factory, postgres_only: None
) -> None:
    results, final, calls = await conflicting_increments(session_factory, attempts=5)
    assert results == [None, None]
    assert final == 2  # both increments landed
    assert calls == 3  # one of the two ran again


async def test_serialization_failure_without_retry_is_raised(
    session_factory: Factory, postgres_only: None
) -> None:
    results, final, calls = await conflicting_increments(session_factory, attempts=1)
    failures = [r for r in results if r is not None]
    assert len(failures) == 1
    assert isinstance(failures[0], SerializationFailure)
    assert getattr(failures[0].__cause__, "orig", None) is not None
    assert final == 1
    assert calls == 2


async def test_deadlock_is_detected_and_retried(
    session_factory: Factory, postgres_only: None
) -> None:
    async with UnitOfWork(session_factory) as uow:
        await UserRepository.create_many(uow.session, [{"name": "x", "age": 0}, {"name": "y"}])
    locked = 0
    both_locked = asyncio.Event()
    calls = 0

    def work(first: str, second: str):  # type: ignore[no-untyped-def]
        async def run(uow: UnitOfWork) -> None:
            nonlocal locked, calls
            calls += 1
            await UserRepository.update_where(uow.session, {"name": first}, {"position": "1"})
            locked += 1
            if locked >= 2:
                both_locked.set()
            await asyncio.wait_for(both_locked.wait(), 10)
            await UserRepository.update_where(uow.session, {"name": second}, {"position": "2"})

        return run

    results = await asyncio.gather(
        run_in_transaction(session_factory, work("x", "y"), attempts=3),
        run_in_transaction(session_factory, work("y", "x"), attempts=3),
        return_exceptions=True,
    )
    assert results == [None, None]
    assert calls == 3

    # and without retry the loser gets DeadlockDetected
    locked, calls = 0, 0
    both_locked.clear()
    results = await asyncio.gather(
        run_in_transaction(session_factory, work("x", "y"), attempts=1),
        run_in_transaction(session_factory, work("y", "x"), attempts=1),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["DeadlockDetected", "NoneType"]
    assert any(isinstance(r, DeadlockDetected) for r in results)


async def test_run_in_transaction_does_not_retry_other_errors(session_factory: Factory) -> None:
    calls = 0

    async def work(uow: UnitOfWork) -> None:
        nonlocal calls
        calls += 1
        await UserRepository.create(uow.session, {"name": "x"})
        raise KeyError("mine")

    with pytest.raises(KeyError):
        await run_in_transaction(session_factory, work, attempts=5)
    assert calls == 1
    assert await user_names(session_factory) == []


async def test_run_in_transaction_returns_the_result(session_factory: Factory) -> None:
    async def work(uow: UnitOfWork) -> int:
        user = await UserRepository.create(uow.session, {"name": "x"})
        await uow.flush()
        return user.id

    user_id = await run_in_transaction(session_factory, work)
    assert isinstance(user_id, int)
    assert await user_names(session_factory) == ["x"]
