"""Development notifier: appends each OTP message as one JSON line to a file (mode 0600)."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from server.domain import OtpMessage
from server.ports import DeliveryFailed


class OutboxNotifier:
    """`Notifier` writing ``{channel, to, transaction_id, otp, sent_at}`` lines to a file.

    The file holds live OTPs, so it is created owner-only; several server processes may append
    at once, so each line is written under an exclusive lock in one write call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def send(self, message: OtpMessage) -> None:
        line = json.dumps(
            {
                "channel": message.channel.value,
                "to": message.to,
                "transaction_id": message.transaction_id,
                "otp": message.otp,
                "sent_at": message.sent_at.isoformat(),
            }
        )
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    os.write(fd, (line + "\n").encode())
                finally:
                    os.close(fd)
        except OSError as err:
            raise DeliveryFailed(f"outbox write failed: {err.strerror}") from err
