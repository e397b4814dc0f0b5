"""The open-file limit: raised at start-up, and the connection cap kept below it."""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger("lamina")

# Descriptors kept for everything that is not a client connection (model files, logs,
# the listening socket, torch's and the tokenizer's threads, /proc reads), with room.
FD_RESERVE = 256
# Where the hard limit is unlimited, the kernel still refuses more than fs.nr_open
# (1,048,576 by default): ask for that much.
UNLIMITED_TARGET = 1 << 20


def raise_fd_soft_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one where the kernel allows it.

    Returns the soft limit in effect afterwards (unchanged when raising is refused)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s",
                           soft, target, exc)  # fmt: skip
            return soft
        return target
    return soft if soft != resource.RLIM_INFINITY else UNLIMITED_TARGET


def connection_cap(configured: int, fd_soft_limit: int) -> int:
    """The connection cap in effect: the configured one, lowered to stay FD_RESERVE
    descriptors below the open-file limit (never below 1)."""
    return max(1, min(configured, fd_soft_limit - FD_RESERVE))
