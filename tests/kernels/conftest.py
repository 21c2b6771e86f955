"""Kernel tests import their float64 reference from kernel_reference.py next to this file.

The suite runs with --import-mode=importlib, which does not put test folders on sys.path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
