import os
import sys
from pathlib import Path

# Tests import the fixture scripts as `fixtures.<name>`.
sys.path.insert(0, str(Path(__file__).parent))
# Two cores on CI: keep torch from oversubscribing them next to MLX.
os.environ.setdefault("OMP_NUM_THREADS", "2")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_kept_plans():
    """Plans are kept by their arguments; tests that change the planner's constants must
    not meet plans made under other ones."""
    from bonsai_mlx.memory import forget_plans

    forget_plans()
    yield
    forget_plans()
