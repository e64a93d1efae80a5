"""The built-in server keeps room for nginx: a trusted proxy's connections are never dropped for
other peers' load, through the shipped config (the server's own suite is tests/process/test_server.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import ezauth
from tests.support.nginx import TARGET, login_through_nginx
from tests.support.process import HALF_HEAD, Crowd, connect, refusals


@pytest.mark.slow
def test_nginx_is_served_while_17_addresses_hold_64_half_sent_heads_each(make_stack):
    """17 loopback addresses (127.0.0.2 ... 127.0.0.18) each hold 64 half-sent heads: 1,088 connections, more
    than MAX_CONNECTIONS. A logged-in user through the shipped nginx config (a trusted proxy, kept-alive
    upstream connections) is still let in on every request, and most of the heads are still held."""
    stack = make_stack()
    browser = stack.browser()
    login_through_nginx(browser)
    crowd = Crowd([])
    try:
        for n in range(17):
            for _ in range(ezauth.MAX_PER_ADDRESS):
                sock = connect(stack.ezauth.port, f"127.0.0.{n + 2}")
                sock.sendall(HALF_HEAD)
                crowd.add(sock)
        with ThreadPoolExecutor(20) as pool:  # 20 at once: nginx needs new connections to ezauth
            replies = list(pool.map(lambda _: browser.get(TARGET), range(60)))
        assert [reply.status for reply in replies] == [200] * 60, [(r.status, r.text[:100]) for r in replies]
        assert all(reply.echo()["path"] == TARGET for reply in replies)
        crowd.read_until(lambda: False, 0.5)
        assert len(crowd.still_open) >= ezauth.MAX_CONNECTIONS - 20, "the heads were not held: no pressure"
        assert refusals(stack.ezauth) == []  # room was made by dropping the oldest heads
    finally:
        crowd.close()
