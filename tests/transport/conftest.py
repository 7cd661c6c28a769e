"""Shared fixtures: a throwaway cluster PKI on disk and a bounded asyncio runner."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from transport.tls import TlsConfig, generate_ca, issue_certificate, write_pem_files


def run(coro: Coroutine[Any, Any, Any], timeout_s: float = 20.0) -> Any:
    """Run one test body with a hard deadline so a hang fails instead of blocking CI."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def unused_udp_port(host: str = "::1") -> int:
    """A UDP port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(slots=True)
class Pki:
    directory: Path
    ca_pem: bytes
    ca_key: bytes

    def issue(self, name: str, *, server: bool = True, client: bool = True) -> tuple[bytes, bytes]:
        return issue_certificate(self.ca_pem, self.ca_key, name, server=server, client=client)

    def tls(self, name: str, client_auth: str = "none") -> TlsConfig:
        cert, key = self.issue(name)
        cert_file, key_file = write_pem_files(self.directory, name, cert, key)
        return TlsConfig(cert_file, key_file, ca_pem=self.ca_pem, client_auth=client_auth)  # type: ignore[arg-type]


def make_pki(directory: Path, name: str = "test-cluster-ca") -> Pki:
    ca_pem, ca_key = generate_ca(name)
    return Pki(directory, ca_pem, ca_key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("other-pki"), "rogue-ca")
