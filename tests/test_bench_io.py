"""benchmarks/bench_io.py runs and reports every layout it measures (a tiny set: the smoke test)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")
ROOT = Path(__file__).resolve().parents[1]


def test_bench_io_reports_every_layout_against_the_floor(tmp_path):
    out = tmp_path / "io"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_io.py"), "--images", "40", "--size", "32",
                    "--methods", "ops", "--tarball", str(tmp_path / "none.tar.gz"), "--levels", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [(r["format"], r["images"]) for r in doc["rows"]] == [("folder", 40), ("webdataset", 40), ("parquet", 40)]
    assert doc["floor_images_per_s"] > 0 and all(r["ratio_to_floor"] > 0 for r in doc["rows"])
    assert [r["level"] for r in doc["levels"]] == [0, 1, 3, 6, 9]
    assert "of the floor" in out.with_suffix(".md").read_text()
