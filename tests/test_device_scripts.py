"""The device scripts cover what they claim (CPU: the scripts are read as text)."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_gpu4_lanes_run_every_gpu_test_file():
    """bench/device_final.sh gpu4 runs each file with GPU tests in exactly one lane."""
    script = (ROOT / "bench" / "device_final.sh").read_text()
    part = script[script.index('if [ "$PART" = gpu4 ]'):script.index("exit 0")]
    in_lanes = re.findall(r"tests/(\w+\.py)", part)
    gpu_files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                       if re.search(r"pytest\.mark\.gpu\b", p.read_text()))
    assert sorted(in_lanes) == gpu_files
