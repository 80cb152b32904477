"""scripts/gpu_session.sh: the one-call GPU session fits its 8 minutes, returns no more files than
the device tool brings back, runs every ``gpu`` test file, and calls the benchmarks with options
they have (checked from ``--dry-run``, without a GPU)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES_BACK = 8  # the device tool returns at most 8 files from $OUT


def _dry_run(mode: str) -> str:
    return subprocess.run(["bash", "scripts/gpu_session.sh", mode, "--dry-run"], cwd=ROOT, check=True,
                          capture_output=True, text=True, env={"OUT": "OUTDIR", "PATH": "/usr/bin:/bin"}).stdout


def _parts(text: str) -> list[tuple[str, int]]:
    return [(name, int(budget)) for name, budget in re.findall(r"^\[(\w+)\] budget (\d+) s$", text, re.M)]


def _written(text: str) -> set[str]:
    files = set()
    for line in re.findall(r"writes: (.*)", text):
        for path in re.findall(r"OUTDIR/[\w./{},]+", line):
            stem, _, brace = path.partition("{")
            files |= {stem + ext for ext in brace.rstrip("}").split(",")} if brace else {path}
    return files | {"OUTDIR/session.txt"}


def test_all_is_one_call_of_at_most_8_minutes():
    text = _dry_run("all")
    parts = _parts(text)
    assert [name for name, _ in parts] == ["setup", "tests", "attention", "train"]
    assert sum(budget for _, budget in parts) <= 8 * 60
    assert len(_written(text)) <= MAX_FILES_BACK, sorted(_written(text))
    for mode in ("tests", "attention", "train", "cp"):  # the one-part-per-call form: each under a 10-minute call
        parts = _parts(_dry_run(mode))
        assert parts[0][0] == "setup" and parts[1][0] == mode and sum(b for _, b in parts) < 10 * 60


def test_every_gpu_test_file_is_run():
    listed = set(re.findall(r"^\s+(tests/\S+\.py)$", _dry_run("all"), re.M))
    uses = re.compile(r"^\s*@pytest\.mark\.gpu|^pytestmark = pytest\.mark\.gpu|marks=pytest\.mark\.gpu", re.M)
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if uses.search(p.read_text())}
    assert listed == marked


def test_benchmark_options_exist():
    for mode in ("all", "attention", "train"):
        for script, args in re.findall(r"(benchmarks/\w+\.py) (.*)", _dry_run(mode)):
            source = (ROOT / script).read_text()
            for flag in re.findall(r"(--[\w-]+)", args):
                assert f'"{flag}"' in source, (script, flag)
