"""dcdit_platform.raycluster.free_port: a port handed to one process is held until that process exits, so no other
process (a second test run, a server started meanwhile) is handed it, and a port a foreign server holds is skipped."""

from __future__ import annotations

import socket
import subprocess
import sys

from dcdit_platform import raycluster
from dcdit_platform.raycluster import PORT_RANGE, free_port

# A second process: is the port named on its command line held (its lock name taken)? Then its own free_port.
CHILD = """
import socket, sys
from dcdit_platform.raycluster import free_port
lock = socket.socket(socket.AF_UNIX)
try:
    lock.bind("\\0dcdit-port-" + sys.argv[1])
    print("free")
except OSError:
    print("held")
print(free_port())
"""


def ask_child(port: int) -> tuple[str, int]:
    child = subprocess.run([sys.executable, "-c", CHILD, str(port)], capture_output=True, text=True, check=True)
    held, other = child.stdout.split()
    return held, int(other)


def test_a_port_stays_held_until_its_process_exits():
    port = free_port()
    assert PORT_RANGE[0] <= port < PORT_RANGE[1]  # never from the kernel's ephemeral range
    held, other = ask_child(port)
    assert held == "held" and other != port
    assert ask_child(other)[0] == "free"  # the child has exited: its port is anyone's again


def test_a_port_a_foreign_server_listens_on_is_skipped(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        for taken in range(PORT_RANGE[0] + 7919, PORT_RANGE[1] - 1):  # any port of the range this server can have
            try:
                server.bind(("127.0.0.1", taken))
                break
            except OSError:
                continue
        server.listen()
        monkeypatch.setattr(raycluster.random, "randrange", lambda low, high: taken)  # the search starts there
        assert free_port() != taken
