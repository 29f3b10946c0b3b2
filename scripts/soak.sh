#!/usr/bin/env bash
# Long reliability runs (marked `soak`): thousands of faulted units of work, repeated load rounds.
# Same rig as scripts/test.sh; expect tens of minutes. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
bash scripts/system-deps.sh
ensure_venv "dev,postgres,redis,rabbitmq,nats,kafka,pubsub,aws,webhook,brokers-test,bench,crypto,dashboard,otel"
exec .venv/bin/python -m pytest -m soak "$@"
