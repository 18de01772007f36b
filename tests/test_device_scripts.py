"""The device scripts cover what they claim (CPU: the scripts are read as text)."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_gpu4_lanes_run_every_gpu_test_file():
    """bench/device_final.sh gpu4 (4 GPUs) and gpu2 (2 GPUs) each run every file with GPU
    tests in exactly one lane."""
    script = (ROOT / "bench" / "device_final.sh").read_text().replace("\\\n", " ")
    lists = {name: re.findall(r"tests/(\w+\.py)", files)
             for name, files in re.findall(r'^(\w+)="([^"]*)"', script, re.M)}
    part = script[script.index('if [ "$PART" = gpu4 ] ||'):script.index("exit 0")]
    four, two = part.split("else", 1)
    gpu_files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py")
                       if re.search(r"pytest\.mark\.gpu\b", p.read_text()))
    for branch in (four, two):
        in_lanes = []
        for args in re.findall(r"^\s*(?:T=\S+ )?lane \w+ [\d,]+ (.*?)&?$", branch, re.M):
            for word in args.split():
                in_lanes += lists[word[1:]] if word.startswith("$") else \
                    re.findall(r"tests/(\w+\.py)", word)
        assert sorted(in_lanes) == gpu_files
