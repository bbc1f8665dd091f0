"""Issue 16, finding 4: a port left in TIME-WAIT by a stopped stack can be used again at once (the
launcher's probe binds with SO_REUSEADDR, as the servers do), while a port with a live listener
is still refused with the clear error."""
from __future__ import annotations

import socket

import pytest

from services.launcher import pick_port


def _time_wait_port() -> int:
    """A port whose server side closed a connection first: that socket now sits in TIME-WAIT."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # the server closes first -> TIME-WAIT on (127.0.0.1:port, client)
    cli.recv(1)
    cli.close()
    srv.close()
    return port


def test_port_in_time_wait_is_reusable():
    port = _time_wait_port()
    with socket.socket() as plain, pytest.raises(OSError):  # the old probe: fails while TIME-WAIT lasts
        plain.bind(("127.0.0.1", port))
    assert pick_port("127.0.0.1", port, "scheduler") == port


def test_port_with_a_listener_is_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot use port {port} for the scheduler"):
            pick_port("127.0.0.1", port, "scheduler")


def test_free_ports_of_one_stack_are_distinct(monkeypatch):
    """The probe socket closes before the next pick, so the OS may offer the same free port twice:
    a port already given to another service of the stack is skipped (CI once saw the scheduler and
    the gateway both get 33247, and the gateway could not bind)."""
    from services import launcher

    offers = iter([41000, 41000, 41000, 41001])
    monkeypatch.setattr(launcher, "_probe_port", lambda host, port, what: port or next(offers))
    assert pick_port("127.0.0.1", 0, "scheduler", {41000}) == 41001
    assert pick_port("127.0.0.1", 41000, "gateway", {41000}) == 41000  # an explicit port is the user's choice
