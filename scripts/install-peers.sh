#!/usr/bin/env bash
# Install the XMPP clients we did not write that the tests use as real peers.
# go-sendxmpp comes from Debian; without root or apt the test that needs it is skipped.
set -u
if command -v go-sendxmpp >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install-peers: installing go-sendxmpp (Debian package)" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q go-sendxmpp >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q go-sendxmpp >/dev/null 2>&1 ||
            echo "install-peers: could not install go-sendxmpp" >&2
    fi
else
    echo "install-peers: go-sendxmpp missing; install it with: apt-get install go-sendxmpp" >&2
fi
exit 0
