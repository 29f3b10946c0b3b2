#!/usr/bin/env bash
# Install the Debian packages the test rig runs: PostgreSQL server, Redis, RabbitMQ, PgBouncer,
# faketime (relays and writers with a skewed clock, tests/events/test_database_clock.py) and
# chromium (the dashboard's browser tests drive Debian's build with Playwright, tests/dashboard).
# Skips what is already there; needs root (or sudo) and Debian's package registry.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v rabbitmq-server >/dev/null || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
command -v pgbouncer >/dev/null || need+=(pgbouncer)
command -v faketime >/dev/null || need+=(faketime)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ "${#need[@]}" -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages start their own services; the test rig runs private instances instead.
for svc in redis-server rabbitmq-server pgbouncer postgresql; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
