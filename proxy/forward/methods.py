"""Methods the proxy answers itself, never forwards: one check, made where both servers admit
a request to a route (the WebSocket upgrade included), before a token is fetched.

- ``TRACE`` and ``TRACK`` ask the upstream to echo the request back, ``Authorization`` with
  it: on a route with a provider the token would reach the client (nginx answers 405 too).
- ``CONNECT`` asks for a tunnel; the proxy forwards HTTP to one upstream and opens none, on
  any route (a ``CONNECT`` to an authority is refused earlier, as not a path).
"""

from __future__ import annotations

from proxy.problems import MethodNotAllowed

ECHOING = frozenset({"TRACE", "TRACK"})
TUNNEL = "CONNECT"
ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def refuse_method(method: str, *, has_provider: bool) -> None:
    """Raise MethodNotAllowed for a method this route never forwards."""
    name = method.upper()  # methods are case-sensitive, an upstream may not be: refuse both
    if name == TUNNEL:
        raise MethodNotAllowed("CONNECT is not proxied", headers={"Allow": ALLOW})
    if has_provider and name in ECHOING:
        raise MethodNotAllowed(
            f"{name} is not forwarded on a route that injects a token", headers={"Allow": ALLOW}
        )
