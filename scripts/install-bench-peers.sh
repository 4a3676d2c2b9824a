#!/usr/bin/env bash
# Install the servers `make bench-compare` measures natterd against, from Debian: Prosody,
# ejabberd (with the SQLite driver its private instance keeps accounts in) and coturn.
# bench/prosody.py, bench/ejabberd.py and bench/stun.py start private instances in temporary
# directories on loopback ports; the system services the packages start are stopped and
# disabled here so they neither hold ports nor use CPU during the runs.
set -u
missing=()
command -v prosody >/dev/null || missing+=(prosody)
[ -f /usr/share/ejabberd/sql/lite.sql ] || missing+=(ejabberd)
ls /usr/lib/erlang/lib 2>/dev/null | grep -q '^p1_sqlite3' || missing+=(erlang-p1-sqlite3)
command -v turnserver >/dev/null || missing+=(coturn)
if [ ${#missing[@]} != 0 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "install-bench-peers: ${missing[*]} missing; install with: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "install-bench-peers: installing ${missing[*]} (Debian packages)" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
            echo "install-bench-peers: could not install ${missing[*]}" >&2
            exit 1
        }
    fi
fi
if [ "$(id -u)" = 0 ]; then
    for service in prosody ejabberd coturn; do
        service "$service" stop >/dev/null 2>&1 || true
        command -v systemctl >/dev/null && systemctl disable "$service" >/dev/null 2>&1 || true
    done
fi
exit 0
