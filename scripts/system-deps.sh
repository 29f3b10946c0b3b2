#!/usr/bin/env bash
# Install the Debian packages the test rig runs: PostgreSQL server, Redis, RabbitMQ, PgBouncer,
# faketime (relays and writers with a skewed clock, tests/events/test_database_clock.py),
# chromium (the dashboard's browser tests drive Debian's build with Playwright, tests/dashboard),
# nats-server (JetStream) and the Google Cloud CLI's Pub/Sub emulator with a Java runtime
# (tests/events/brokers.py). The Kafka-protocol broker (Tansu) and moto come from PyPI
# (alchemium[brokers-test]).
# Skips what is already there; needs root (or sudo) and Debian's package registry.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v rabbitmq-server >/dev/null || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
command -v pgbouncer >/dev/null || need+=(pgbouncer)
command -v faketime >/dev/null || need+=(faketime)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v java >/dev/null || need+=(default-jre-headless)
# The emulator is a package of Google's own apt repository (present on these machines);
# where that repository is not configured the Pub/Sub tests say what is missing.
if [ ! -x /usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator ] \
    && apt-cache show google-cloud-cli-pubsub-emulator >/dev/null 2>&1; then
    need+=(google-cloud-cli-pubsub-emulator)
fi
if [ "${#need[@]}" -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages start their own services; the test rig runs private instances instead.
for svc in redis-server rabbitmq-server pgbouncer postgresql nats-server; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
