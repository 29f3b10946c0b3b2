#!/usr/bin/env bash
# The whole suite: system packages, virtualenv, lint, format check, mypy --strict, pytest
# on SQLite and a throwaway PostgreSQL (plus Redis/RabbitMQ/PgBouncer the rig starts).
# Extra arguments go to pytest. Long soak runs: scripts/soak.sh.
source "$(dirname "$0")/_env.sh"
bash scripts/system-deps.sh
ensure_venv "dev,postgres,redis,rabbitmq,nats,kafka,pubsub,aws,webhook,brokers-test,bench"
echo "== ruff check";        .venv/bin/ruff check alchemium tests examples bench
echo "== ruff format";       .venv/bin/ruff format --check alchemium tests examples bench
echo "== mypy --strict";     .venv/bin/mypy --strict alchemium
echo "== import contracts";  .venv/bin/lint-imports --no-logo --no-cache
echo "== pytest";            .venv/bin/python -m pytest -m "not soak" "$@"
