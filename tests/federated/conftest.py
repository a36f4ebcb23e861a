"""The federated-round tests share helpers in fedlive.py (next to this file)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
