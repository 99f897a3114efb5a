import os
import sys
from pathlib import Path

# Tests import the fixture scripts as `fixtures.<name>`.
sys.path.insert(0, str(Path(__file__).parent))
# Two cores on CI: keep torch from oversubscribing them next to MLX.
os.environ.setdefault("OMP_NUM_THREADS", "2")
