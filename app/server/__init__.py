"""The HTTP connection layer under the ASGI app: connection cap, read timeouts, half-close
(app/server/protocol.py), their counters (app/server/connections.py) and the fd limit
(app/server/fd_limit.py)."""
