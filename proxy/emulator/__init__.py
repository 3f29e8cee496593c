"""The LM Studio emulator: a stand-in LM Studio 0.4.x server for the tests, the demo and the
bench (docs/design.md §5). `Emulator` (from `app`) is the server; the other modules are its parts.
"""

from __future__ import annotations

from proxy.emulator.app import Emulator

__all__ = ["Emulator"]
