"""The one exception of the protocol layer: an error that becomes a reply errno.

Decoders and handlers raise `ProtocolError(errno, message)`; the request pipeline
turns it into a header-only error reply (ERROR flag + errno) for that message.
Errors that mean the byte stream itself can no longer be trusted (bad header size,
garbage type bits) are raised as `StreamError`, a subclass: the connection is
dropped instead of answered.
"""
from __future__ import annotations

import errno as _errno


class ProtocolError(Exception):
    """A protocol-level failure carrying the errno the peer should see."""

    def __init__(self, errno: int, message: str = "") -> None:
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"{name}: {message}" if message else name)
        self.errno = errno
        self.message = message


class StreamError(ProtocolError):
    """The stream is out of sync or hostile: disconnect rather than reply."""
