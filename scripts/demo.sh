#!/usr/bin/env bash
# Run the quick start demo on embedded SQLite (no server needed).
source "$(dirname "$0")/_env.sh"
ensure_venv "postgres"
cd "$ROOT/examples" && exec ../.venv/bin/python quickstart.py
