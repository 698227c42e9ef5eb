"""A synchronous gRPC server on 127.0.0.1 for tests that need a real peer (a fake cluster, an
OTLP receiver): the servicers are registered, the server started on a free port, and stopped
(without grace) when the block ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc


@contextmanager
def loopback_grpc_server(*register: Callable[[grpc.Server], None]) -> Iterator[int]:
    """Serve what each ``register(server)`` adds; yields the port."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    for add in register:
        add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait()
