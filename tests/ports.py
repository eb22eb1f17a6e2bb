"""A free loopback port for a test's server or for `accelerate launch`'s rendezvous; benchmarks/common.py
re-exports it for the benchmarks."""

import socket


def free_port() -> int:
    """A port the OS reports free now (another process could take it before it is used; none has here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
