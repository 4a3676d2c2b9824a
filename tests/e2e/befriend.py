"""Mutual presence subscription between two logged-in clients (RFC 6121 §3)."""

from __future__ import annotations

from tests.e2e.harness import Client, next_matching


async def befriend(alice: Client, bob: Client) -> None:
    """Both directions of RFC 6121 §3 subscription, as a client's user would do it."""
    alice.send_presence_subscription(pto=bob.boundjid.bare)
    await next_matching(bob.presences, lambda p: p["type"] == "subscribe")
    bob.send_presence(pto=alice.boundjid.bare, ptype="subscribed")
    bob.send_presence_subscription(pto=alice.boundjid.bare)
    await next_matching(alice.presences, lambda p: p["type"] == "subscribe")
    alice.send_presence(pto=bob.boundjid.bare, ptype="subscribed")
    # Both sides have processed the last approval once Bob has received it.
    await next_matching(
        bob.presences, lambda p: p["type"] == "subscribed" and p["from"] == alice.boundjid.bare
    )
