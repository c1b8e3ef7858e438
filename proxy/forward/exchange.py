"""What one proxied request did: filled by the forwarder, read by observability."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    path: str  # raw path as received, query string not included
    client: str  # peer address
    started: float  # time.perf_counter() at arrival
    route: str = ""  # route prefix, "" when no route matched; admin paths use "/-/"
    provider: str = ""
    client_id: str = ""  # inbound client id when clients are configured
    status: int = 0  # status sent to the client (0: none was sent)
    upstream_status: int = 0
    ttfb: float | None = None  # seconds from arrival to first upstream response byte
    bytes_in: int = 0  # request body bytes read from the client
    bytes_out: int = 0  # response body bytes written to the client
    replayed: bool = False
    replay_outcome: str = ""  # "", "succeeded", "unauthorized_again", "body_too_large" (the
    # request body), "budget" (the body did not fit the process's replay budgets),
    # "response_too_large" (the 401 itself: relayed as sent)
    error: str = ""  # short reason when it failed: "connect", "timeout", "token", "client_gone"...
    upstream_error: str = ""  # a transport.ErrorKind when the upstream failed
