#!/usr/bin/env bash
# Bring up what the test suite needs and print the environment for it (eval its output).
#
# PostgreSQL and Redis are used where they answer at the configured URLs; otherwise
# the machine's own service is started; otherwise throwaway instances are started
# from local binaries under .test-services/; otherwise we stop with the packages to install.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
state="$here/.test-services"
pg_url=${NATTER_TEST_POSTGRES_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/postgres}
redis_url=${NATTER_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}

say() { echo "test-services: $*" >&2; }

port_open() {  # host port
    python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(1)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
PY
}

url_host() { python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or int(sys.argv[2]))' "$1" "$2"; }

# -- PostgreSQL ---------------------------------------------------------------------------
read -r pg_host pg_port <<<"$(url_host "$pg_url" 5432)"
if ! port_open "$pg_host" "$pg_port"; then
    if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null; then
        say "starting the machine's PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >&2 || true
        for _ in $(seq 1 30); do port_open "$pg_host" "$pg_port" && break; sleep 0.5; done
    fi
fi
if ! port_open "$pg_host" "$pg_port"; then
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
    if [ -n "$bindir" ] && [ -x "$bindir/initdb" ]; then
        say "starting a throwaway PostgreSQL from $bindir on port 55432"
        mkdir -p "$state"
        runas=""
        [ "$(id -u)" = 0 ] && { chown -R postgres "$state" 2>/dev/null; runas="runuser -u postgres --"; }
        if [ ! -d "$state/pg" ]; then
            $runas "$bindir/initdb" -D "$state/pg" -U postgres --auth=trust >/dev/null || exit 1
        fi
        $runas "$bindir/pg_ctl" -D "$state/pg" -o "-p 55432 -k /tmp -c listen_addresses=127.0.0.1" \
            -l "$state/pg.log" -w start >&2 || exit 1
        pg_url="postgresql+asyncpg://postgres@127.0.0.1:55432/postgres"
    else
        say "PostgreSQL is not reachable at $pg_host:$pg_port and no server binaries were found."
        say "Install it (Debian/Ubuntu: apt-get install postgresql) or set NATTER_TEST_POSTGRES_URL."
        exit 1
    fi
fi

# -- Redis --------------------------------------------------------------------------------
read -r redis_host redis_port <<<"$(url_host "$redis_url" 6379)"
if ! port_open "$redis_host" "$redis_port"; then
    if command -v redis-server >/dev/null; then
        say "starting Redis on $redis_host:$redis_port"
        redis-server --daemonize yes --bind "$redis_host" --port "$redis_port" --save "" \
            --appendonly no >&2
        for _ in $(seq 1 20); do port_open "$redis_host" "$redis_port" && break; sleep 0.25; done
    else
        say "Redis is not reachable at $redis_host:$redis_port and redis-server is not installed."
        say "Install it (Debian/Ubuntu: apt-get install redis-server) or set NATTER_TEST_REDIS_URL."
        exit 1
    fi
fi

echo "export NATTER_TEST_POSTGRES_URL='$pg_url'"
echo "export NATTER_TEST_REDIS_URL='$redis_url'"
