"""Constants and helpers shared by the test modules (conftest.py holds the fixtures)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN_KEY = b"golden-tests-only-not-a-real-master-key"
