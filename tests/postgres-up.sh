#!/usr/bin/env bash
# The Postgres server the tests use: 127.0.0.1:5432, user postgres without a password (trust),
# database `test`. Start it if it is down; on a machine without it, install Debian's package
# (as root) and allow the tests in. Each test session then creates a database of its own.
set -euo pipefail

ready() { command -v pg_isready >/dev/null && pg_isready -h 127.0.0.1 -p 5432 -q; }

if ! ready; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        if [ "$(id -u)" != 0 ]; then
            echo "postgres-up: no Postgres here; install Debian's postgresql package" >&2
            exit 1
        fi
        echo "postgres-up: installing Debian's postgresql package" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        version=$(ls /etc/postgresql | sort -V | tail -1)
        # The tests connect over TCP as postgres, without a password: this machine only.
        sed -i '1i host all postgres 127.0.0.1/32 trust' "/etc/postgresql/$version/main/pg_hba.conf"
    fi
    version=$(ls /etc/postgresql | sort -V | tail -1)
    echo "postgres-up: starting Postgres $version" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 30); do ready && break; sleep 1; done
    ready || { echo "postgres-up: Postgres did not start; see /var/log/postgresql/" >&2; exit 1; }
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
fi
