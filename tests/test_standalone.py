"""A clone stands alone: cloned into an empty folder with nothing beside it, the demo plays the stream the README
describes and reaches the verdicts the README states (this test's Python environment is reused; the package is
imported from the clone)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def stated_verdicts(readme: str) -> dict[str, tuple[int, int]]:
    """What the README says `make demo` prints, read from its sentence about it."""
    recall = re.search(
        r"\*\*(\d+) of (\d+)\*\*\s+recall\s+questions\s+right\s+for\s+InfiniteVL,\s+\*\*(\d+) of (\d+)\*\*\s+for\s+SWA-only",
        readme,
    )
    reads = re.search(r"\(InfiniteVL\s+(\d+)/(\d+),\s+SWA-only\s+(\d+)/(\d+)\)", readme)
    assert recall and reads, "the README no longer states the demo's verdicts in the sentence this test reads"
    n = [int(x) for x in recall.groups() + reads.groups()]
    return {"recall": (n[0], n[1]), "recall_swa": (n[2], n[3]), "read": (n[4], n[5]), "read_swa": (n[6], n[7])}


def printed_verdicts(out: str) -> dict[str, tuple[int, int]]:
    recall = re.search(r"^(\d+)/(\d+) correct;", out, flags=re.M)
    recall_swa = re.search(r"^SWA-only: (\d+)/(\d+) correct", out, flags=re.M)
    read = re.search(r"^(\d+)/(\d+) read back exactly", out, flags=re.M)
    read_lines = [line for line in out.splitlines() if line.lstrip().startswith("Read the last")]
    assert recall and recall_swa and read and read_lines, out[-3000:]
    read_swa = sum("SWA-only: correct" in line for line in read_lines)
    return {
        "recall": (int(recall[1]), int(recall[2])),
        "recall_swa": (int(recall_swa[1]), int(recall_swa[2])),
        "read": (int(read[1]), int(read[2])),
        "read_swa": (read_swa, len(read_lines)),
    }


def test_a_clone_in_an_empty_folder_runs_the_demo_as_the_readme_says(tmp_path):
    alone = tmp_path / "empty"
    alone.mkdir()
    clone = alone / "InfiniteVL"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert sorted(p.name for p in alone.iterdir()) == ["InfiniteVL"]  # nothing beside it

    found = subprocess.run(
        ["grep", "-rn", "--exclude-dir=.git", r"\.\./shared", "."], cwd=clone, capture_output=True, text=True
    )
    assert found.returncode == 1 and not found.stdout, found.stdout

    env = {
        **os.environ,
        "PYTHONPATH": str(clone),  # the clone's package, not the checkout this test runs from
        "INFINITEVL_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import infinitevl; print(infinitevl.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(clone)), where.stdout

    proc = subprocess.run(
        [sys.executable, "-m", "infinitevl.cli.main", "demo"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert printed_verdicts(proc.stdout) == stated_verdicts((clone / "README.md").read_text())


def test_missing_photographs_are_an_error_naming_the_folder_not_other_data(tmp_path):
    """Before, a folder without photographs silently gave streams on a gradient background (other verdicts)."""
    import pytest

    from infinitevl.tasks.digit_recall import FrameMaker

    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        FrameMaker("eval", 0, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FrameMaker("eval", 0, tmp_path / "nowhere")
    proc = subprocess.run(
        [sys.executable, "-m", "infinitevl.cli.main", "demo", "--media", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and str(tmp_path) in proc.stderr and "Traceback" not in proc.stderr
