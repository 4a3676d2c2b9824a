#!/usr/bin/env bash
# Install the clients we did not write that the tests use as real peers, from Debian:
# go-sendxmpp (XMPP), stun-client (`stun`, an RFC 3489 STUN client), iptables and nftables
# (the NAT labs; nft counts RTP and RTCP per relay port)
# and coturn (the NAT lab's cross-check and bench/stun.py; its system service stays off).
# Without root or apt the tests that need them are skipped.
set -u
missing=()
command -v go-sendxmpp >/dev/null || missing+=(go-sendxmpp)
command -v stun >/dev/null || missing+=(stun-client)
command -v iptables >/dev/null || missing+=(iptables)
command -v nft >/dev/null || missing+=(nftables)
command -v turnserver >/dev/null || missing+=(coturn)
if [ ${#missing[@]} = 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install-peers: installing ${missing[*]} (Debian packages)" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
            echo "install-peers: could not install ${missing[*]}" >&2
    fi
else
    echo "install-peers: ${missing[*]} missing; install with: apt-get install ${missing[*]}" >&2
fi
exit 0
