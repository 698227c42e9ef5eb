"""Which TCP addresses are listening, read from Linux's /proc (no psutil); a free port to bind."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LISTEN = "0A"  # the TCP_LISTEN state in /proc/net/tcp*
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def available() -> bool:
    return Path("/proc/net/tcp").exists() and Path("/proc/self/fd").exists()


def _listening_rows() -> Iterator[tuple[Address, int, str]]:
    """(address, port, socket inode) of every listening TCP socket on this machine."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)  # 32-bit words, each in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            yield ipaddress.ip_address(packed), int(hex_port, 16), fields[9]


def listening() -> set[tuple[str, int]]:
    """(address, port) of every socket of this process in the listening state."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed while we looked: not listening any more
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return {(str(a), port) for a, port, inode in _listening_rows() if inode in inodes}


def listening_on(port: int) -> set[Address]:
    """Addresses listening on ``port``, in any process."""
    return {address for address, p, _ in _listening_rows() if p == port}


def is_loopback_address(address: Address) -> bool:
    """Loopback, counting IPv4-mapped IPv6 (gRPC binds 127.0.0.1 as ::ffff:127.0.0.1)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
