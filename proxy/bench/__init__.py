"""The benchmark behind `lmswitch bench` (docs/design.md §6): `runner` is the command."""

from __future__ import annotations
