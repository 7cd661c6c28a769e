"""STOQ transport: QUIC (aioquic) + TLS 1.3 + msgpack envelopes. See docs/PROTOCOL.md."""

from .client import StoqClient
from .envelope import PROTOCOL_VERSION, ApiError, ErrorCode, Request, Response
from .peers import PeerAddress, PeerMesh
from .server import CallContext, HandlerRegistry, Limits, SessionTicketStore, StoqServer
from .tls import TlsConfig, generate_ca, issue_certificate, verify_client_chain

__all__ = [
    "PROTOCOL_VERSION", "ApiError", "CallContext", "ErrorCode", "HandlerRegistry", "Limits", "PeerAddress",
    "PeerMesh", "Request", "Response", "SessionTicketStore", "StoqClient", "StoqServer", "TlsConfig",
    "generate_ca", "issue_certificate", "verify_client_chain",
]
