#!/usr/bin/env python3
"""Remove each guarantee from the code, one at a time: the tests that prove it must fail.

Every row of docs/guarantees.md names, in its last column, the mutations its tests
catch. Each mutation in ``CATALOG`` below is data: a name, the guarantee it attacks,
where the code is (a file, or a glob the code may move within), an exact snippet of
that code and its replacement, and the pytest node ids that must fail. For each one
this script

1. copies the repository's files (tracked and new, not ignored) to a temporary
   directory and replaces the snippet there; a snippet that is not found exactly once
   is an error: a refactor that moves the code must update the catalog, never pass
   silently;
2. runs the named tests in the copy with ``PYTHONPATH`` pointing at it, so the copy
   shadows the installed (editable) package in pytest and in every process the tests
   start (relays, crash writers, examples): a smoke run of
   ``tests/test_rig.py`` checks exactly that before anything else;
3. reads the JUnit report: the mutation is *killed* only if every named test failed
   (in its body, or in its teardown's checks). A test that passed is a *survivor*.
   Anything else is an *error*: a test not found or skipped, a collection or import
   error, a setup error, a timeout.

It prints a summary table and exits non-zero if any mutation survived or errored.
Mutations run in parallel (``--jobs``, default 4: the tests mostly wait on servers).

Usage::

    python scripts/mutations.py                  # every mutation
    python scripts/mutations.py --only no_shield --only skip_outbox_write
    python scripts/mutations.py --list           # the catalog, nothing run
    python scripts/mutations.py --keep           # keep the copies (their paths are printed)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUARANTEES = "docs/guarantees.md"
BASE = "_unmutated"  # the snapshot of the repository every copy is made from
SMOKE = "tests/test_rig.py::test_the_suite_and_the_processes_it_starts_import_this_checkout"
# A failure mentioning one of these broke the code, not the guarantee.
BROKEN = re.compile(r"\b(ImportError|ModuleNotFoundError|SyntaxError|IndentationError|NameError)\b")


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One guarantee taken out of the code, and the tests that must notice."""

    name: str
    guarantee: str  # the row of docs/guarantees.md it attacks, in a few words
    where: str  # a path, or a glob: the snippet must occur exactly once in all matches
    find: str  # one line: a substring; several lines: a block, matched at any indentation
    replace: str
    tests: tuple[str, ...]  # pytest node ids; every one must fail
    args: tuple[str, ...] = ()  # extra pytest arguments
    slow: bool = False  # scheduled first


CATALOG: tuple[Mutation, ...] = (
    # -- units of work -----------------------------------------------------------------
    Mutation(
        name="commit_on_error",
        guarantee="an exception rolls the unit of work back",
        where="alchemium/uow.py",
        find="""
            if exc is not None:
                await self._finish(rollback=True)
                if isinstance(exc, sa_exc.StatementError):
            """,
        replace="""
            if exc is not None and not isinstance(exc, Exception):
                await self._finish(rollback=True)
                if isinstance(exc, sa_exc.StatementError):
            """,
        tests=("tests/test_uow.py::test_exception_rolls_back_and_propagates[outbox-sqlite]",),
    ),
    Mutation(
        name="commit_on_cancel",
        guarantee="a cancelled unit of work commits nothing",
        where="alchemium/uow.py",
        find="""
            if exc is not None:
                await self._finish(rollback=True)
                if isinstance(exc, sa_exc.StatementError):
            """,
        replace="""
            if exc is not None and not isinstance(exc, asyncio.CancelledError):
                await self._finish(rollback=True)
                if isinstance(exc, sa_exc.StatementError):
            """,
        tests=(
            "tests/test_uow.py::test_cancelled_tasks_roll_back_and_return_every_connection"
            "[outbox-sqlite]",
            "tests/test_uow.py::test_cancellation_between_two_flushed_writes_commits_neither"
            "[outbox-sqlite]",
            "tests/test_uow.py::test_cancellation_between_two_flushed_writes_commits_neither"
            "[no_outbox-sqlite]",
            "tests/test_uow.py::test_cancellation_between_two_flushed_writes_commits_neither"
            "[outbox-postgresql]",
            "tests/test_uow.py::test_cancellation_between_two_flushed_writes_commits_neither"
            "[no_outbox-postgresql]",
        ),
    ),
    Mutation(
        name="no_shield",
        guarantee="COMMIT, ROLLBACK and close finish although cancelled",
        where="alchemium/shielding.py",
        find="steps = awaitable.__await__()",
        replace="return (yield from awaitable.__await__())  # mutation: nothing shielded",
        tests=(
            "tests/test_uow.py::test_commit_in_progress_finishes_although_the_task_is_cancelled"
            "[outbox-postgresql]",
            "tests/test_uow.py::test_commit_in_progress_finishes_although_the_task_is_cancelled"
            "[no_outbox-postgresql]",
        ),
    ),
    Mutation(
        name="shield_the_final_flush",
        guarantee="the flush before COMMIT stays cancellable",
        where="alchemium/uow.py",
        find="shield=lambda: committing",
        replace="shield=None",
        # One commit path: the shielded flush of the first keeps its row lock past the
        # test, so a second test in the same run errors in setup instead of failing.
        tests=(
            "tests/test_uow.py::test_final_flush_blocked_on_a_lock_stays_cancellable"
            "[outbox-postgresql]",
        ),
    ),
    Mutation(
        name="leak_8k_per_unit",
        guarantee="memory stays flat per unit of work",
        where="alchemium/uow.py",
        find="""
            session = self._session
            self._state = "closed"
            """,
        replace="""
            session = self._session
            self._state = "closed"
            globals().setdefault("_MUTATION_LEAK", []).append(bytearray(8192))
            """,
        tests=(
            "tests/reliability/test_load.py::test_memory_per_unit_of_work_stays_flat[sqlite]",
            "tests/reliability/test_load.py::test_memory_per_unit_of_work_stays_flat[postgresql]",
        ),
        slow=True,
    ),
    Mutation(
        name="session_left_open_on_error",
        guarantee="every connection goes back to the pool",
        where="alchemium/uow.py",
        find="""
            try:
                if rollback:
                    await session.rollback()
            finally:
                session.info.pop(UOW_KEY, None)
                await session.close()
            """,
        replace="""
            session.info.pop(UOW_KEY, None)  # mutation: neither rolled back nor closed
            """,
        tests=(
            "tests/reliability/test_load.py::test_thousand_concurrent_units_with_cancellation"
            "[postgresql]",
        ),
        slow=True,
    ),
    Mutation(
        name="keep_savepoint_events",
        guarantee="a rolled-back savepoint discards its events",
        where="alchemium/uow.py",
        find="del self._events[marks[0] :]",
        replace="pass  # mutation: events of a rolled-back savepoint kept",
        tests=(
            "tests/events/test_dispatch.py::"
            "test_events_inside_a_rolled_back_savepoint_are_discarded[sqlite-keep]",
        ),
    ),
    Mutation(
        name="skip_outbox_write",
        guarantee="the outbox holds an event iff its change committed",
        where="alchemium/events/**/*.py",
        find="commit.info[self] = write_events(uow, session, events)",
        replace="commit.info[self] = local_delivery(uow, events)  # mutation: no outbox rows",
        tests=(
            "tests/reliability/test_atomicity.py::"
            "test_outbox_holds_an_event_iff_its_change_committed[sqlite-120]",
        ),
    ),
    Mutation(
        name="dispatch_rows_inserted_delivered",
        guarantee="a SIGKILLed writer's committed events reach every destination",
        where="alchemium/events/**/*.py",
        find='"status": CLAIMED if claim_now else PENDING,',
        replace='"status": "delivered" if claim_now else PENDING,',
        tests=(
            "tests/reliability/test_crashes.py::test_sigkilled_writer_loses_no_committed_event"
            "[sqlite]",
            "tests/reliability/test_crashes.py::test_sigkilled_writer_loses_no_committed_event"
            "[postgresql]",
            "tests/events/test_marks.py::"
            "test_a_process_killed_with_marks_queued_loses_nothing[sqlite]",
            "tests/events/test_marks.py::"
            "test_a_process_killed_with_marks_queued_loses_nothing[postgresql]",
        ),
        slow=True,
    ),
    Mutation(
        name="connect_errors_unmapped",
        guarantee="work failing in a server restart raises TransactionError",
        where="alchemium/errors.py",
        find="""
            if isinstance(err, OSError):
            """,
        replace="""
            if False:  # mutation: socket errors while connecting leak out unmapped
            """,
        tests=(
            "tests/reliability/test_restart.py::"
            "test_restart_under_load_fails_in_flight_work_cleanly_and_loses_nothing[postgresql]",
        ),
        slow=True,
    ),
    Mutation(
        name="no_retry",
        guarantee="serialization failures and deadlocks are retried",
        where="alchemium/uow.py",
        find="if not err.transient or attempt == attempts:",
        replace="if True:  # mutation: never retried",
        tests=(
            "tests/test_uow.py::test_serialization_failure_is_retried[outbox-postgresql]",
            "tests/test_uow.py::test_deadlock_is_detected_and_retried[outbox-postgresql]",
        ),
    ),
    Mutation(
        name="sqlite_unique_unmapped",
        guarantee="errors map to the same exception on both databases",
        where="alchemium/errors.py",
        find="2067: UniqueViolation,  # SQLITE_CONSTRAINT_UNIQUE",
        replace="2067: IntegrityViolation,  # mutation",
        tests=("tests/test_errors.py::test_violation_at_flush[outbox-sqlite-unique]",),
    ),
    # -- input ---------------------------------------------------------------------------
    Mutation(
        name="ne_drops_nulls",
        guarantee="random valid filters select what Python selects",
        where="alchemium/filters.py",
        find="or_(c != v, c.is_(None))",
        replace="c != v",
        tests=(
            "tests/reliability/test_hostile_input.py::"
            "test_random_valid_filters_match_a_python_evaluation[sqlite]",
        ),
        args=("--hypothesis-seed=0",),
    ),
    Mutation(
        name="filter_values_unchecked",
        guarantee="junk input is rejected before any SQL is sent",
        where="alchemium/filters.py",
        find='info.check_value(field, scalar, what="filter value")',
        replace="pass  # mutation: filter values go to the database unchecked",
        tests=(
            "tests/reliability/test_hostile_input.py::"
            "test_junk_input_is_rejected_before_any_sql_or_answered[postgresql]",
        ),
        args=("--hypothesis-seed=0",),
    ),
    Mutation(
        name="unknown_data_keys_accepted",
        guarantee="bad data keys are rejected before anything is sent",
        where="alchemium/writes.py",
        find="""
            if key not in info.columns:
                raise FieldNotFoundError(info.name, key, info.columns)
            """,
        replace="""
            pass  # mutation: unknown keys not checked
            """,
        tests=(
            "tests/test_repository.py::"
            "test_unknown_data_key_is_rejected_before_anything_is_sent[sqlite-keep]",
        ),
    ),
    # -- events and delivery ---------------------------------------------------------------
    Mutation(
        name="outbox_in_own_transaction",
        guarantee="a rollback leaves no outbox row and calls no handler",
        where="alchemium/events/**/*.py",
        find="""
            with span:
                outbox.write(session, events, rows, claim_token=token, lease=lease, notify=external)
            """,
        replace="""
            with span, Session(session.get_bind()) as own:  # mutation: a transaction of its own
                outbox.write(own, events, rows, claim_token=token, lease=lease, notify=external)
                own.commit()
            """,
        tests=(
            "tests/events/test_dispatch.py::"
            "test_failed_commit_rolls_back_without_dispatch[postgresql-keep]",
        ),
    ),
    Mutation(
        name="failing_handler_raises",
        guarantee="a failing handler stops no other and never raises",
        where="alchemium/events/**/*.py",
        find="failures.append((event, subscriber, err))",
        replace="raise  # mutation",
        tests=(
            "tests/events/test_dispatch.py::"
            "test_one_failing_handler_does_not_stop_the_others[sqlite-keep]",
        ),
    ),
    Mutation(
        name="record_before_publish",
        guarantee="a SIGKILLed relay loses no event",
        where="alchemium/events/**/*.py",
        find="outcomes = await self._publish_all(batch)",
        replace=(
            "await self._record(batch.token, [_Outcome(r, None) for r in batch.rows])  # mutation\n"
            "            outcomes = await self._publish_all(batch)"
        ),
        tests=(
            "tests/events/test_relay.py::"
            "test_sigkilled_relay_then_second_relay_delivers_everything_at_least_once[sqlite]",
        ),
    ),
    Mutation(
        name="claim_without_row_locks",
        guarantee="concurrent relays never deliver an event twice",
        where="alchemium/events/**/*.py",
        find="""
            .with_for_update(skip_locked=True)
            .cte("picked")
            """,
        replace="""
            .cte("picked")
            """,
        tests=(
            "tests/events/test_relay.py::"
            "test_relay_processes_deliver_every_event_exactly_once[4-postgresql]",
        ),
        slow=True,
    ),
    Mutation(
        name="no_heartbeat",
        guarantee="a slow batch keeps its lease while it publishes",
        where="alchemium/events/relay.py",
        find="""
            renewed = await self.outbox.renew(session, token, self.lease)
            """,
        replace="""
            renewed = 0  # mutation: the heartbeat renews nothing
            """,
        tests=(
            "tests/events/test_relay.py::test_heartbeat_keeps_the_lease_of_a_slow_batch[sqlite]",
            "tests/events/test_relay.py::test_heartbeat_keeps_the_lease_of_a_slow_batch[postgresql]",
        ),
    ),
    Mutation(
        name="dispatch_before_commit",
        guarantee="handlers run after COMMIT, never before",
        where="alchemium/events/dispatch.py",
        find="""
            commit.events = events
            commit.info[self] = write_events(uow, session, events)
            """,
        replace="""
            commit.events = events
            commit.info[self] = write_events(uow, session, events)
            from sqlalchemy.util import await_only  # mutation: dispatch before COMMIT

            await_only(dispatch_events(uow.session, events, commit.info[self]))
            commit.events = []
            """,
        tests=(
            "tests/events/test_dispatch.py::"
            "test_sync_and_async_handlers_run_once_after_commit[sqlite-keep]",
            "tests/events/test_dispatch.py::"
            "test_sync_and_async_handlers_run_once_after_commit[postgresql-keep]",
        ),
    ),
    Mutation(
        name="unfenced_completion",
        guarantee="a stale relay cannot overwrite the reclaiming relay's outcome",
        where="alchemium/events/outbox.py",
        find="""
            where = [d.c.claim_token == bindparam("token"), d.c.status == CLAIMED]
            if ids is not None:
            """,
        replace="""
            where = []  # mutation: a completion touches rows whatever their claim and state
            if ids is not None:
            """,
        tests=(
            "tests/events/test_relay.py::"
            "test_stale_relay_cannot_overwrite_the_outcome_of_the_reclaiming_relay[sqlite]",
            "tests/events/test_relay.py::"
            "test_stale_relay_cannot_overwrite_the_outcome_of_the_reclaiming_relay[postgresql]",
        ),
    ),
    Mutation(
        name="no_claim_token_fencing",
        guarantee="a stale relay cannot overwrite the reclaiming relay's outcome",
        where="alchemium/events/**/*.py",
        find="""
            where = [d.c.claim_token == bindparam("token"), d.c.status == CLAIMED]
            if ids is not None:
            """,
        replace="""
            where = [d.c.status == CLAIMED]  # mutation: not fenced by the claim token
            if ids is not None:
            """,
        tests=(
            "tests/events/test_relay.py::"
            "test_stale_relay_cannot_complete_rows_the_reclaiming_relay_still_holds[sqlite]",
            "tests/events/test_relay.py::"
            "test_stale_relay_cannot_complete_rows_the_reclaiming_relay_still_holds[postgresql]",
        ),
    ),
    Mutation(
        name="lease_from_python_clock",
        guarantee="leases and due times come from the database's clock",
        where="alchemium/events/outbox_schema.py",
        find="""
            if offset is None:
                return "statement_timestamp()"
            return f"(statement_timestamp() + make_interval(secs => {offset}))"
            """,
        replace="""
            import datetime as _dt  # mutation: the clock of the process, not the database's

            now = f"'{_dt.datetime.now(_dt.timezone.utc).isoformat()}'::timestamptz"
            if offset is None:
                return now
            return f"({now} + make_interval(secs => {offset}))"
            """,
        tests=(
            "tests/events/test_database_clock.py::"
            "test_a_relay_60s_ahead_does_not_take_a_claim_kept_alive_by_heartbeats[postgresql]",
            "tests/events/test_database_clock.py::"
            "test_an_event_committed_by_a_writer_20s_ahead_is_delivered_at_once[postgresql]",
        ),
    ),
    Mutation(
        name="no_stranded_warning",
        guarantee="nothing is stranded silently",
        where="alchemium/events/subscribers.py",
        find="""
            if is_main_module_name(name):
                warnings.warn(
            """,
        replace="""
            if is_main_module_name(name) and False:  # mutation: no warning
                warnings.warn(
            """,
        tests=(
            "tests/events/test_stranded_destinations.py::"
            "test_a_script_shows_the_warning_at_its_decorator",
        ),
    ),
    Mutation(
        name="claim_by_position",
        guarantee="an event committed late is still delivered",
        where="alchemium/events/**/*.py",
        find="""
                and_(d.c.status == CLAIMED_SQL, d.c.claimed_until < now),
            ),
            """,
        replace="""
                and_(d.c.status == CLAIMED_SQL, d.c.claimed_until < now),
            ),
            d.c.id  # mutation: only rows after the last delivered one, by position
            > select(text("coalesce(max(id), 0)"))
            .select_from(d)
            .where(d.c.status == DELIVERED)
            .correlate_except(d)
            .scalar_subquery(),
            """,
        tests=(
            "tests/events/test_relay.py::"
            "test_event_committed_after_a_later_transaction_is_still_delivered[postgresql]",
            "tests/reliability/test_long_transaction.py::"
            "test_relays_keep_delivering_past_a_long_open_transaction[postgresql]",
        ),
        slow=True,
    ),
    Mutation(
        name="never_dead",
        guarantee="poison events go dead after max_attempts",
        where="alchemium/events/**/*.py",
        find="return DEAD if attempts >= max_attempts else None",
        replace="return None  # mutation",
        tests=(
            "tests/events/test_relay.py::"
            "test_failing_delivery_is_retried_then_dead_and_others_unaffected[sqlite]",
        ),
    ),
    Mutation(
        name="unordered_claims",
        guarantee="per-aggregate order holds",
        where="alchemium/events/**/*.py",
        find="""
            if ordered:
                earlier = d.alias("earlier")
            """,
        replace="""
            if False:  # mutation: ordered mode ignores earlier rows
                earlier = d.alias("earlier")
            """,
        tests=(
            "tests/events/test_relay.py::"
            "test_per_aggregate_order_holds_under_random_failures[postgresql]",
            "tests/events/test_relay.py::test_per_aggregate_order_holds_under_random_failures[sqlite]",
            "tests/events/test_relay.py::"
            "test_ordered_mode_holds_an_aggregate_behind_its_dead_event[sqlite]",
        ),
    ),
    Mutation(
        name="relay_dies_on_database_error",
        guarantee="the relay survives a PostgreSQL restart",
        where="alchemium/events/**/*.py",
        find="""
            except Exception:
                failures += 1
            """,
        replace="""
            except Exception:
                raise  # mutation: a failed round ends the relay
            """,
        tests=(
            "tests/events/test_relay.py::test_relay_resumes_after_postgres_restart[postgresql]",
        ),
    ),
    Mutation(
        name="listen_loss_unnoticed",
        guarantee="a killed LISTEN connection is replaced",
        where="alchemium/events/**/*.py",
        find="""
            while not lost.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(lost.wait(), _LISTEN_CHECK)
                if not lost.is_set():
                    await asyncio.wait_for(conn.execute("SELECT 1"), _LISTEN_CHECK)
            """,
        replace="""
            await asyncio.Event().wait()  # mutation: a lost LISTEN connection goes unnoticed
            """,
        tests=(
            "tests/events/test_relay_liveness.py::"
            "test_relay_reconnects_after_its_listen_connection_is_killed[postgresql]",
        ),
    ),
    Mutation(
        name="inbox_always_new",
        guarantee="the inbox gives exactly-once effects",
        where="alchemium/events/**/*.py",
        find="return bool(result.rowcount == 1)",
        replace="return True  # mutation: every delivery looks like the first",
        tests=("tests/events/test_inbox.py::test_redelivery_by_the_relay_has_one_effect[sqlite]",),
    ),
    Mutation(
        name="no_polling",
        guarantee="without NOTIFY, polling delivers everything",
        where="alchemium/events/**/*.py",
        find="await self._sleep(self.poll_interval, wakeable=True)",
        replace="await self._wake.wait()  # mutation: only a notification wakes the relay",
        tests=(
            "tests/events/test_relay.py::test_polling_delivers_with_listen_disabled[sqlite]",
            "tests/events/test_relay.py::test_polling_delivers_with_listen_disabled[postgresql]",
        ),
    ),
    Mutation(
        name="publish_failure_counts_as_delivered",
        guarantee="a broker outage leaves events pending",
        where="alchemium/events/**/*.py",
        find="""
            except Exception as err:  # noqa: BLE001 - any publish failure is recorded on the row
                outcome = _Outcome(row, err)
            """,
        replace="""
            except Exception:  # mutation: a failed publish is recorded as delivered
                outcome = _Outcome(row, None)
            """,
        tests=(
            "tests/events/test_publishers.py::"
            "test_rabbitmq_stopped_while_a_relay_runs_loses_no_event[sqlite]",
        ),
        slow=True,
    ),
    Mutation(
        name="batch_failure_counts_as_delivered",
        guarantee="a broker outage leaves events pending (batch publishers)",
        where="alchemium/events/relay.py",
        find="""
            except Exception as err:  # noqa: BLE001 - any publish failure is recorded on the row
                return [_Outcome(row, err) for row in rows]
            """,
        replace="""
            except Exception:  # mutation: a failed batch is recorded as delivered
                return [_Outcome(row, None) for row in rows]
            """,
        tests=(
            "tests/events/test_publishers.py::"
            "test_redis_outage_leaves_events_pending_until_it_is_back[sqlite]",
        ),
        slow=True,
    ),
    # -- operations dashboard ----------------------------------------------------------
    Mutation(
        name="action_ignores_row_state",
        guarantee="an action on rows changed meanwhile changes nothing",
        where="alchemium/events/outbox_admin.py",
        find="stmt = update(d).where(*self._dead_where(selection))",
        replace="stmt = update(d).where(*self._dead_where(selection)[1:])  # mutation: any state",
        tests=(
            "tests/dashboard/test_api.py::"
            "test_a_row_changed_meanwhile_is_a_409_and_nothing_changes[sqlite]",
            "tests/dashboard/test_api.py::"
            "test_a_row_changed_meanwhile_is_a_409_and_nothing_changes[postgresql]",
            "tests/dashboard/test_api.py::"
            "test_two_operators_requeueing_the_same_row_at_once_change_it_once[sqlite]",
            "tests/dashboard/test_api.py::"
            "test_two_operators_requeueing_the_same_row_at_once_change_it_once[postgresql]",
        ),
    ),
    Mutation(
        name="action_not_recorded",
        guarantee="every operator action is recorded",
        where="alchemium/dashboard/state.py",
        find="""
            await self.action_log.record(
                conn,
                actor=actor,
                action=action,
                delivery_ids=changed,
                selection=None if selection is None else asdict(selection),
                client=client,
            )
            """,
        replace="""
            # mutation: the action is not recorded
            """,
        tests=(
            "tests/dashboard/test_api.py::"
            "test_requeue_by_api_records_who_and_a_relay_then_delivers[sqlite]",
            "tests/dashboard/test_api.py::"
            "test_form_actions_need_the_csrf_token_and_the_same_origin[postgresql]",
        ),
    ),
    Mutation(
        name="read_only_accepts_actions",
        guarantee="a read-only dashboard refuses every action",
        where="alchemium/dashboard/security.py",
        find="if not self.actions:",
        replace="if False:  # mutation: actions allowed without actions=True",
        tests=(
            "tests/dashboard/test_api.py::"
            "test_read_only_dashboard_has_no_buttons_and_refuses_every_action[sqlite]",
            "tests/dashboard/test_api.py::"
            "test_read_only_dashboard_has_no_buttons_and_refuses_every_action[postgresql]",
        ),
    ),
    Mutation(
        name="bad_event_id_unchecked",
        guarantee="bad input is a 4xx, never a 500",
        where="alchemium/dashboard/params.py",
        find="""
                return uuid.UUID(raw)
            except ValueError as err:
            """,
        replace="""
                return uuid.UUID(raw)
            except TypeError as err:  # mutation: a malformed id escapes as ValueError
            """,
        tests=(
            "tests/dashboard/test_api.py::"
            "test_bad_requests_get_a_clear_json_error[sqlite-api-events-not-a-uuid]",
            "tests/dashboard/test_api.py::"
            "test_bad_page_requests_get_an_error_page[sqlite-events-xyz]",
        ),
    ),
    # -- broker publishers ---------------------------------------------------------------
    Mutation(
        name="publisher_start_skipped",
        guarantee="bad publisher configuration fails when the relay starts",
        where="alchemium/events/relay.py",
        find="await start_publisher(publisher)",
        replace="pass  # mutation: publishers are not checked before the first claim",
        tests=(
            "tests/events/test_publish_outcomes.py::"
            "test_failing_start_stops_the_relay_before_it_claims_anything[sqlite]",
            "tests/events/test_publish_outcomes.py::"
            "test_start_runs_once_before_the_first_claim[sqlite]",
        ),
    ),
    Mutation(
        name="nats_msg_id_dropped",
        guarantee="a NATS redelivery in the dedup window is no duplicate",
        where="alchemium/events/publishers/nats.py",
        find='headers = {**message.headers, "Nats-Msg-Id": str(event.id)}',
        replace="headers = dict(message.headers)  # mutation: no Nats-Msg-Id",
        tests=(
            "tests/events/test_broker_rules.py::"
            "test_nats_redelivery_inside_the_dedup_window_counts_as_delivered[sqlite]",
        ),
    ),
    Mutation(
        name="pubsub_key_not_resumed",
        guarantee="a Pub/Sub ordering key is resumed after a failure",
        where="alchemium/events/publishers/pubsub.py",
        find="self._ready().resume_publish(self.topic_path, key)",
        replace="pass  # mutation: the paused ordering key stays paused",
        tests=(
            "tests/events/test_broker_rules.py::"
            "test_pubsub_ordering_key_is_resumed_after_a_failed_publish",
        ),
    ),
    Mutation(
        name="cloudevent_id_not_event_id",
        guarantee="the CloudEvents envelope carries the event (read by the SDK)",
        where="alchemium/events/publishers/cloudevents.py",
        find='"id": str(event.id),',
        replace='"id": event.name,  # mutation: consumers cannot de-duplicate on the id',
        tests=(
            "tests/events/test_cloudevents.py::test_http_binding_is_read_back_by_the_sdk[binary]",
            "tests/events/test_cloudevents.py::test_kafka_binding_is_read_back_by_the_sdk[binary]",
            "tests/events/test_cloudevents.py::"
            "test_amqp_binding_is_read_back_by_the_sdk[structured]",
        ),
    ),
    Mutation(
        name="debezium_names_dropped",
        guarantee="the Debezium shape has the outbox event router's columns",
        where="alchemium/events/outbox_schema.py",
        find='"aggregate_id": "aggregateid"',
        replace='"aggregate_id": "aggregate_id"',  # mutation: not the router's column name
        tests=(
            "tests/events/test_debezium_outbox.py::"
            "test_events_table_has_the_router_columns_and_values[sqlite]",
        ),
    ),
    Mutation(
        name="audit_in_own_transaction",
        guarantee="audit rows exist iff the change committed",
        where="alchemium/events/**/*.py",
        find="_default[0].write(session, commit.all_events())",
        replace=(
            "with Session(session.get_bind()) as own:  # mutation: a transaction of its own\n"
            "                _default[0].write(own, commit.all_events())\n"
            "                own.commit()"
        ),
        tests=(
            "tests/events/test_audit.py::"
            "test_no_audit_row_when_the_change_is_rolled_back[postgresql-keep-failed_commit]",
        ),
    ),
    # -- events that live for years (issue 17) ----------------------------------------------
    Mutation(
        name="relay_skips_upcasting",
        guarantee="old events are delivered at the current schema version",
        where="alchemium/events/**/*.py",
        find="event = upcasters.upcast(row.event)",
        replace="event = row.event  # mutation: published as stored",
        tests=(
            "tests/events/test_upcasting.py::test_relay_delivers_events_written_at_v1_as_v2[sqlite]",
            "tests/events/test_upcasting.py::"
            "test_relay_delivers_events_written_at_v1_as_v2[postgresql]",
        ),
    ),
    Mutation(
        name="failed_upcast_counts_as_delivered",
        guarantee="a failing upcaster loses nothing",
        where="alchemium/events/**/*.py",
        find="""
            event = prepare_delivery(row, self.upcasters)
            sending = publisher.publish(event, row.destination)
            """,
        replace="""
            try:
                event = prepare_delivery(row, self.upcasters)
            except Exception:  # mutation: an event that cannot be upcast is skipped
                return _Outcome(row, None)
            sending = publisher.publish(event, row.destination)
            """,
        tests=(
            "tests/events/test_upcasting.py::"
            "test_a_failing_upcaster_loses_nothing_dead_then_delivered_after_fix_and_requeue[sqlite]",
        ),
    ),
    Mutation(
        name="replay_resets_undelivered_rows",
        guarantee="a replay never duplicates a pending delivery",
        where="alchemium/events/outbox_lifecycle.py",
        find="""
            d.c.destination == destination,
            d.c.status == DELIVERED,
            """,
        replace="""
            d.c.destination == destination,
            d.c.status.in_((DELIVERED, PENDING, CLAIMED)),  # mutation
            """,
        tests=(
            "tests/events/test_replay.py::"
            "test_replay_schedules_routed_events_once_and_marks_them[sqlite]",
        ),
    ),
    Mutation(
        name="replay_outruns_the_relays",
        guarantee="a replay paced by max_waiting waits for the relays",
        where="alchemium/events/outbox_lifecycle.py",
        find="if int((await session.execute(waiting)).scalar_one()) < max_waiting:",
        replace="if True:  # mutation: never waits",
        tests=(
            "tests/events/test_replay.py::test_max_waiting_paces_a_replay_by_the_relays[sqlite]",
        ),
    ),
    Mutation(
        name="requeue_all_takes_abandoned",
        guarantee="abandoned deliveries stay out of a requeue of every dead row",
        where="alchemium/events/**/*.py",
        find="statuses = (DEAD, ABANDONED) if include_abandoned else (DEAD,)",
        replace="statuses = (DEAD, ABANDONED)  # mutation",
        tests=(
            "tests/events/test_resubmission.py::"
            "test_a_destination_policy_abandons_after_its_attempts_and_requeue_all_leaves_them"
            "[sqlite]",
        ),
    ),
    Mutation(
        name="erasure_keeps_the_key",
        guarantee="erase_subject leaves the subject's values unreadable",
        where="alchemium/events/**/*.py",
        find=".values(key=None, erased_at=database_now())",
        replace=".values(erased_at=database_now())  # mutation: the key survives",
        tests=(
            "tests/events/test_personal_data.py::"
            "test_erasing_a_subject_leaves_no_plaintext_of_it_and_keeps_the_others[postgresql]",
        ),
    ),
    # -- observability -----------------------------------------------------------------
    Mutation(
        name="trace_context_not_stored",
        guarantee="the request's trace reaches the relay's publish",
        where="alchemium/uow.py",
        find="_telemetry.add_trace_context(meta)",
        replace="pass  # mutation: the recording span's context is not stored",
        tests=(
            "tests/observability/test_end_to_end_trace.py::"
            "test_request_commit_dispatch_and_relay_publish_share_one_trace[sqlite]",
            "tests/observability/test_tracing.py::"
            "test_an_event_stores_the_span_current_when_it_was_recorded[sqlite]",
        ),
    ),
    Mutation(
        name="publish_under_the_claim",
        guarantee="the publish span is a child of the recording span",
        where="alchemium/events/observe.py",
        find="parent=claim if recorded is None else recorded,",
        replace="parent=claim,  # mutation: the stored context is not restored",
        tests=(
            "tests/observability/test_end_to_end_trace.py::"
            "test_request_commit_dispatch_and_relay_publish_share_one_trace[sqlite]",
            "tests/observability/test_tracing.py::"
            "test_publish_span_belongs_to_the_recording_trace_and_links_the_claim[sqlite]",
        ),
    ),
    Mutation(
        name="invalid_context_stored",
        guarantee="without an SDK no trace context is stored",
        where="alchemium/telemetry.py",
        find="""
            if not context.is_valid:
                return
            """,
        replace="""
            pass  # mutation: an invalid (all-zero) context is stored too
            """,
        tests=(
            "tests/observability/test_tracing.py::"
            "test_without_an_sdk_no_span_is_made_and_no_context_is_stored[sqlite]",
        ),
    ),
    Mutation(
        name="amqp_without_trace_headers",
        guarantee="AMQP messages carry the trace context",
        where="alchemium/events/publishers/rabbitmq.py",
        find="**trace_headers(event),",
        replace="# mutation: no trace context in the headers",
        tests=(
            "tests/observability/test_brokers.py::test_amqp_headers_carry_the_publish_span[sqlite]",
        ),
    ),
    Mutation(
        name="redis_without_trace_headers",
        guarantee="Redis entries carry the trace context",
        where="alchemium/events/publishers/redis.py",
        find="**trace_headers(event),",
        replace="# mutation: no trace context in the fields",
        tests=(
            "tests/observability/test_brokers.py::"
            "test_redis_fields_carry_the_recorded_context_when_the_relay_is_not_traced[sqlite]",
            "tests/observability/test_end_to_end_trace.py::"
            "test_request_commit_dispatch_and_relay_publish_share_one_trace[sqlite]",
        ),
    ),
    Mutation(
        name="deliveries_uncounted",
        guarantee="scraped figures match the outbox tables",
        where="alchemium/events/relay_monitor.py",
        find="self.deliveries[key] = self.deliveries.get(key, 0) + n",
        replace="pass  # mutation: deliveries are not counted",
        tests=(
            "tests/observability/test_metrics.py::"
            "test_scraped_figures_match_the_outbox_tables[sqlite]",
        ),
    ),
    Mutation(
        name="stall_unnoticed",
        guarantee="a stalled relay fails its health check",
        where="alchemium/events/monitoring.py",
        find="if busy_for is not None and busy_for > stall:",
        replace="if False:  # mutation: a round without progress is not noticed",
        tests=(
            "tests/observability/test_health.py::"
            "test_a_stalled_round_and_a_lagging_destination_are_unhealthy[sqlite]",
        ),
    ),
    Mutation(
        name="logs_without_event_id",
        guarantee="delivery log records name the event",
        where="alchemium/events/observe.py",
        find='"event_id": str(event.id),',
        replace="# mutation: log records do not name the event",
        tests=(
            "tests/observability/test_logs.py::"
            "test_relay_records_name_event_destination_attempt_and_claim[sqlite]",
            "tests/observability/test_logs.py::"
            "test_a_failing_subscriber_is_logged_with_its_event_and_claim[sqlite]",
        ),
    ),
    Mutation(
        name="drop_periods_with_undelivered_rows",
        guarantee="a period with an undelivered row is never dropped",
        where="alchemium/events/outbox_partitions.py",
        # Both counts: either alone keeps a period with an undelivered row (the count
        # before the detach spares writes to that period a moment without a partition).
        find="""
                undelivered = await self._undelivered_in(conn, part.deliveries)
                if undelivered:
                    kept.append((part, undelivered))
                    continue
                await self._detach(conn, self.deliveries.name, part.deliveries, part)
                undelivered = await self._undelivered_in(conn, part.deliveries)
            """,
        replace="""
                undelivered = 0  # mutation: periods are dropped whatever they hold
                if undelivered:
                    kept.append((part, undelivered))
                    continue
                await self._detach(conn, self.deliveries.name, part.deliveries, part)
                undelivered = 0
            """,
        tests=(
            "tests/events/test_outbox_partitions.py::"
            "test_old_periods_are_dropped_whole_and_undelivered_ones_kept",
        ),
    ),
    Mutation(
        name="drop_without_recount",
        guarantee="a row made pending between the count and the detach keeps its period",
        where="alchemium/events/outbox_partitions.py",
        find="""
                await self._detach(conn, self.deliveries.name, part.deliveries, part)
                undelivered = await self._undelivered_in(conn, part.deliveries)
            """,
        replace="""
                await self._detach(conn, self.deliveries.name, part.deliveries, part)
                undelivered = 0  # mutation: the detached partition is not counted again
            """,
        tests=(
            "tests/events/test_outbox_partitions.py::"
            "test_a_replay_between_the_count_and_the_detach_keeps_the_period",
        ),
    ),
    Mutation(
        name="partition_of_waits_for_writers",
        guarantee="making partitions never waits for a writer",
        where="alchemium/events/outbox_partitions.py",
        find=(
            'yield text(f"CREATE TABLE IF NOT EXISTS {child} (LIKE {table} INCLUDING DEFAULTS)")'
        ),
        replace=('yield text(f"CREATE TABLE IF NOT EXISTS {child} PARTITION OF {table} {bounds}")'),
        tests=(
            "tests/events/test_outbox_partitions.py::"
            "test_making_partitions_never_waits_for_a_writer",
        ),
    ),
    Mutation(
        name="interrupted_detach_left_pending",
        guarantee="a drop interrupted mid-detach is finished by the next one",
        where="alchemium/events/outbox_partitions.py",
        find='mode = "FINALIZE" if finalize else "CONCURRENTLY"',
        replace='mode = "CONCURRENTLY"  # mutation: a pending detach is started again',
        tests=(
            "tests/events/test_outbox_partitions.py::"
            "test_a_cancelled_drop_is_finished_by_the_next_one",
        ),
    ),
    Mutation(
        name="retention_drop_blocks_the_relay",
        guarantee="a relay keeps delivering while its retention drop waits",
        where="alchemium/events/relay.py",
        find="""
            if self._dropping is None or self._dropping.done():
                self._dropping = asyncio.create_task(self._drop_in_background(older_than))
            return 0
            """,
        replace="""
            await self._drop_periods(older_than)  # mutation: the relay waits for its drop
            return 0
            """,
        tests=(
            "tests/events/test_outbox_partitions.py::"
            "test_a_relay_keeps_delivering_while_its_retention_drop_waits",
        ),
    ),
    Mutation(
        name="no_early_claim",
        guarantee="a notification during a publish: the new events are claimed meanwhile",
        where="alchemium/events/relay.py",
        find="""
                    if following is None and more and self._woken():
                        # (_woken is False once stop() was called: it wakes the relay too.)
                        following = asyncio.create_task(self._claim())
            """,
        replace="""
                    pass  # mutation: the next claim waits for this batch's record
            """,
        tests=(
            "tests/events/test_relay.py::"
            "test_events_committed_while_a_batch_publishes_are_claimed_while_it_is_recorded[postgresql]",
        ),
    ),
    Mutation(
        name="ordered_claims_early",
        guarantee="an ordered relay keeps the notification for the round after the record",
        where="alchemium/events/relay.py",
        find="        if self.ordered or self._stopping.is_set() or not self._wake.is_set():",
        replace=(
            "        if self._stopping.is_set() or not self._wake.is_set():"
            "  # mutation: ordered relays claim early too"
        ),
        tests=(
            "tests/events/test_relay.py::"
            "test_an_ordered_relay_claims_early_only_what_it_may_deliver[postgresql]",
        ),
    ),
    Mutation(
        name="stop_claims_more",
        guarantee="a notification during a publish: the new events are claimed meanwhile",
        where="alchemium/events/relay.py",
        find="        if self.ordered or self._stopping.is_set() or not self._wake.is_set():",
        replace="        if self.ordered or not self._wake.is_set():  # mutation: stop() wakes",
        tests=(
            "tests/events/test_relay.py::test_stop_during_a_publish_claims_nothing_more[sqlite]",
        ),
    ),
    Mutation(
        name="statuses_bound",
        guarantee="cached generic plans of the relay's statements use the due index",
        where="alchemium/events/outbox_schema.py",
        find="""    return literal_column(f"'{value}'", String())""",
        replace="""    return literal(value, String())  # mutation: statuses bound as parameters""",
        tests=(
            "tests/events/test_outbox_scale.py::"
            "test_the_plans_postgres_caches_for_the_relays_statements_read_undelivered_rows_only[postgresql]",
        ),
    ),
    Mutation(
        name="several_destinations_sorted",
        guarantee="a relay of several destinations reads a batch per destination",
        where="alchemium/events/outbox_schema.py",
        find="        if len(destinations) == 1:",
        replace="        if True:  # mutation: every due row of all destinations sorted",
        tests=(
            "tests/events/test_outbox_scale.py::"
            "test_a_relay_of_several_destinations_reads_a_batch_per_destination[postgresql]",
        ),
    ),
)


# -- applying a mutation ---------------------------------------------------------------------


class CatalogError(Exception):
    """The catalog no longer matches the code or the docs: update it."""


def _block(snippet: str) -> list[str]:
    return textwrap.dedent(snippet).strip("\n").splitlines()


def _matches(text: str, find: str) -> list[tuple[int, int, str]]:
    """Where ``find`` occurs in ``text``: (start, end, indentation) character spans.

    One line: every occurrence as a substring. Several lines: every run of whole lines
    equal to the dedented block under one common indentation.
    """
    lines = _block(find)
    if len(lines) == 1:
        return [(m.start(), m.end(), "") for m in re.finditer(re.escape(lines[0]), text)]
    found = []
    source = text.splitlines(keepends=True)
    offsets = [0]
    for line in source:
        offsets.append(offsets[-1] + len(line))
    relative = len(lines[0]) - len(lines[0].lstrip())
    for i in range(len(source) - len(lines) + 1):
        first = source[i].rstrip("\n")
        indent = first[: max(0, len(first) - len(first.lstrip()) - relative)]
        if all(
            source[i + k].rstrip("\n") == (indent + line if line else "")
            for k, line in enumerate(lines)
        ):
            found.append((offsets[i], offsets[i + len(lines)], indent))
    return found


def locate(root: Path, mutation: Mutation) -> tuple[Path, int, int, str]:
    """The one place ``mutation.find`` occurs under ``root``; CatalogError otherwise."""
    paths = sorted(Path(p) for p in glob.glob(str(root / mutation.where), recursive=True))
    hits = [
        (path, *span)
        for path in paths
        if path.is_file()
        for span in _matches(path.read_text(encoding="utf-8"), mutation.find)
    ]
    if len(hits) != 1:
        where = ", ".join(f"{p.relative_to(root)}" for p, *_ in hits) or "nowhere"
        raise CatalogError(
            f"mutation {mutation.name}: its snippet occurs {len(hits)} times in "
            f"{mutation.where} ({where}), not once; the code moved or changed: update the "
            f"catalog in scripts/mutations.py.\nSnippet:\n{textwrap.dedent(mutation.find)}"
        )
    return hits[0]


def apply(root: Path, mutation: Mutation) -> Path:
    """Replace the snippet in the copy at ``root``; returns the file changed."""
    path, start, end, indent = locate(root, mutation)
    text = path.read_text(encoding="utf-8")
    lines = _block(mutation.replace)
    if len(_block(mutation.find)) == 1:
        new = "\n".join(lines)
    else:
        new = "".join((indent + line if line else "") + "\n" for line in lines)
    path.write_text(text[:start] + new + text[end:], encoding="utf-8")
    subprocess.run([sys.executable, "-m", "py_compile", str(path)], check=True)
    return path


# -- the docs and the catalog agree ------------------------------------------------------------


def guarantee_rows(root: Path) -> list[tuple[str, list[str]]]:
    """(guarantee, mutation names) for each row of the tables with a Mutation column."""
    rows: list[tuple[str, list[str]]] = []
    column: int | None = None
    for line in (root / GUARANTEES).read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            column = next((i for i, c in enumerate(cells) if c.startswith("Mutation")), -1)
            continue
        if column < 0 or set(cells[0]) <= {"-", ":"}:
            continue
        rows.append((cells[0], re.findall(r"`([a-z0-9_]+)`", cells[column])))
    return rows


def check_docs(root: Path) -> None:
    rows = guarantee_rows(root)
    known = {m.name for m in CATALOG}
    problems = []
    if not rows:
        problems.append(f"{GUARANTEES} has no table with a Mutation column")
    for guarantee, names in rows:
        if not names:
            problems.append(f"row without a mutation: {guarantee[:70]}")
        problems += [f"row names unknown mutation {n!r}" for n in names if n not in known]
    named = {n for _, names in rows for n in names}
    problems += [f"mutation {n!r} is in no row of {GUARANTEES}" for n in sorted(known - named)]
    if len({m.name for m in CATALOG}) != len(CATALOG):
        problems.append("two mutations share a name")
    if problems:
        raise CatalogError("\n".join(problems))


# -- running -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    mutation: Mutation
    verdict: str  # killed / SURVIVED / ERROR
    detail: str
    seconds: float
    log_tail: str = ""


def repository_files(root: Path) -> list[str]:
    """Tracked and new (not ignored) files: what a clone with this work would hold."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    return [f for f in out.stdout.decode().split("\0") if f and (root / f).is_file()]


def copy_repository(files: list[str], source: Path, destination: Path) -> None:
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target)


def run_pytest(
    copy: Path, tests: tuple[str, ...], args: tuple[str, ...], timeout: float, tag: str
) -> tuple[int | None, Path, Path]:
    """Run ``tests`` in ``copy``; returns (exit code or None on timeout, report, log)."""
    report, log = copy / ".mutation-report.xml", copy / ".mutation.log"
    env = {**os.environ, "PYTHONPATH": str(copy), "ALCHEMIUM_MUTATION": tag}
    command = [
        sys.executable,
        *("-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--no-header"),
        f"--junitxml={report}",
        f"--basetemp={copy / '.pytest-tmp'}",
        *args,
        *tests,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout), report, log
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest finishes its fixtures (servers stopped, files removed).
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None, report, log


def junit_outcomes(report: Path) -> dict[str, tuple[str, str]]:
    """node id -> (outcome, text): passed, failed, teardown, setup, skipped, collection."""
    outcomes: dict[str, tuple[str, str]] = {}
    if not report.exists():
        return outcomes
    for case in ET.parse(report).getroot().iter("testcase"):
        # classname "tests.test_uow", name "test_x[a]" -> "tests/test_uow.py::test_x[a]"
        classname = case.get("classname", "")
        nodeid = f"{classname.replace('.', '/')}.py::{case.get('name', '')}"
        for child in case:
            message, text = child.get("message", ""), f"{child.get('message', '')}\n{child.text}"
            if child.tag == "failure":
                outcomes[nodeid] = ("failed", text)
            elif child.tag == "error" and "collection failure" in message:
                outcomes[nodeid] = ("collection", text)
            elif child.tag == "error" and "teardown" in message:
                outcomes.setdefault(nodeid, ("teardown", text))
            elif child.tag == "error":
                outcomes[nodeid] = ("setup", text)
            elif child.tag == "skipped":
                outcomes[nodeid] = ("skipped", text)
        outcomes.setdefault(nodeid, ("passed", ""))
    return outcomes


def judge(mutation: Mutation, code: int | None, report: Path) -> tuple[str, str]:
    if code is None:
        return "ERROR", "timed out"
    outcomes = junit_outcomes(report)
    collection = [n for n, (o, _) in outcomes.items() if o == "collection"]
    if collection:
        return "ERROR", f"collection error in {collection[0]}"
    missing = [t for t in mutation.tests if t not in outcomes]
    if missing:
        return "ERROR", f"not run: {missing[0]}"
    survivors = [t for t in mutation.tests if outcomes[t][0] == "passed"]
    if survivors:
        return "SURVIVED", f"passed: {survivors[0]}"
    for test in mutation.tests:
        outcome, text = outcomes[test]
        if outcome not in ("failed", "teardown"):
            return "ERROR", f"{outcome}: {test}"
        broken = BROKEN.search(text)
        if broken:
            return "ERROR", f"{broken.group(1)} in {test}: the mutation broke the code"
    return "killed", f"{len(mutation.tests)}/{len(mutation.tests)} failed"


def run_mutation(mutation: Mutation, files: list[str], work: Path, timeout: float) -> Result:
    started = time.monotonic()
    copy = work / mutation.name
    copy_repository(files, work / BASE, copy)
    try:
        apply(copy, mutation)
    except (CatalogError, subprocess.CalledProcessError) as err:
        return Result(mutation, "ERROR", str(err).splitlines()[0], time.monotonic() - started)
    code, report, log = run_pytest(copy, mutation.tests, mutation.args, timeout, mutation.name)
    verdict, detail = judge(mutation, code, report)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""
    return Result(mutation, verdict, detail, time.monotonic() - started, tail)


def smoke(files: list[str], work: Path, timeout: float, tests: set[str]) -> None:
    """In an unmutated copy: pytest and its subprocesses import the copy; ``tests`` exist."""
    copy = work / "_smoke"
    copy_repository(files, work / BASE, copy)
    code, report, log = run_pytest(copy, (SMOKE,), (), timeout, "smoke")
    if code != 0 or junit_outcomes(report).get(SMOKE, ("",))[0] != "passed":
        sys.stdout.write(log.read_text(errors="replace")[-4000:])
        raise CatalogError("smoke run failed: the tests do not import the copy under test")
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *tests],
        cwd=copy,
        env={**os.environ, "PYTHONPATH": str(copy)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    missing = sorted(tests - set(listed.stdout.split()))
    if missing:
        raise CatalogError(
            "tests named in the catalog do not exist (renamed? update scripts/mutations.py):\n"
            + "\n".join(f"    {t}" for t in missing)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=480.0, help="seconds per mutation")
    parser.add_argument("--list", action="store_true", help="print the catalog and exit")
    parser.add_argument("--keep", action="store_true", help="keep the mutated copies")
    options = parser.parse_args(argv)

    unknown = set(options.only) - {m.name for m in CATALOG}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in CATALOG if not options.only or m.name in options.only]
    if options.list:
        for m in CATALOG:
            print(f"{m.name}: {m.guarantee} ({m.where})")
            for test in m.tests:
                print(f"    {test}")
        return 0
    try:
        check_docs(ROOT)
        for mutation in CATALOG:
            locate(ROOT, mutation)
    except CatalogError as err:
        print(f"mutations: {err}", file=sys.stderr)
        return 2

    started = time.monotonic()
    files = repository_files(ROOT)
    work = Path(tempfile.mkdtemp(prefix="alchemium-mutations-"))
    copy_repository(files, ROOT, work / BASE)  # a snapshot: later edits do not leak in
    results: list[Result] = []
    try:
        smoke(files, work, options.timeout, {t for m in chosen for t in m.tests})
        chosen.sort(key=lambda m: not m.slow)  # the slow ones first: a shorter total
        with concurrent.futures.ThreadPoolExecutor(max(1, options.jobs)) as pool:
            futures = [pool.submit(run_mutation, m, files, work, options.timeout) for m in chosen]
            for future in concurrent.futures.as_completed(futures):
                result = future.result()
                results.append(result)
                print(
                    f"  {result.verdict:<8} {result.mutation.name} ({result.seconds:.0f}s)",
                    flush=True,
                )
    except CatalogError as err:
        print(f"mutations: {err}", file=sys.stderr)
        return 2
    finally:
        if options.keep:
            print(f"mutated copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    order = {m.name: i for i, m in enumerate(CATALOG)}
    results.sort(key=lambda r: order[r.mutation.name])
    width = max(len(r.mutation.name) for r in results)
    print(f"\n{'mutation':<{width}}  {'guarantee attacked':<62} {'result':<8} {'time':>5}  detail")
    for r in results:
        print(
            f"{r.mutation.name:<{width}}  {r.mutation.guarantee:<62} {r.verdict:<8} "
            f"{r.seconds:>4.0f}s  {r.detail}"
        )
    bad = [r for r in results if r.verdict != "killed"]
    for r in bad:
        what = "survived: its tests pass without it" if r.verdict == "SURVIVED" else "error"
        print(f"\nmutation {r.mutation.name} {what} ({r.detail}); end of its pytest output:")
        print(textwrap.indent(r.log_tail, "    "))
    print(
        f"\n{len(results) - len(bad)} of {len(results)} mutations killed in "
        f"{time.monotonic() - started:.0f}s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
