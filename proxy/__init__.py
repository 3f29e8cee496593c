"""lmswitch: an OpenAI-compatible proxy that loads and swaps models in LM Studio on demand."""

from __future__ import annotations

__version__ = "0.1.0"
