#!/usr/bin/env bash
# The whole suite: system packages, virtualenv, lint, format check, mypy --strict, pytest
# on SQLite and a throwaway PostgreSQL (plus Redis/RabbitMQ/PgBouncer the rig starts),
# then the mutation check (scripts/mutations.py: each guarantee's tests fail without it).
# Extra arguments go to pytest, and then the mutation check is left out.
# Long soak runs: scripts/soak.sh.
source "$(dirname "$0")/_env.sh"
bash scripts/system-deps.sh
ensure_venv "dev,postgres,redis,rabbitmq,nats,kafka,pubsub,aws,webhook,brokers-test,bench,crypto,dashboard,otel"
echo "== ruff check";        .venv/bin/ruff check alchemium tests examples bench scripts
echo "== ruff format";       .venv/bin/ruff format --check alchemium tests examples bench scripts
echo "== mypy --strict";     .venv/bin/mypy --strict alchemium
echo "== import contracts";  .venv/bin/lint-imports --no-logo --no-cache
echo "== pytest"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
.venv/bin/python -m pytest -m "not soak" "$@" 2>&1 | tee "$log"
# The suite fails on these itself (tests/conftest.py); this also sees those printed
# after pytest has finished, at interpreter exit.
if grep -q "exception was never retrieved" "$log"; then
    echo "FAILED: asyncio reported an exception nobody retrieved (see the output above)"
    exit 1
fi
if [ "$#" -eq 0 ]; then
    echo "== mutations";     .venv/bin/python scripts/mutations.py
fi
