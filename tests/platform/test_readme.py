"""The README as a new user follows it: its runnable blocks, in order, in one shell, on a fresh offline machine.

Every ```bash and ```python block of README.md has a marker on the line before it (a block without one fails the
test, so that each new block is decided on):

    <!-- runnable -->                      the block runs exactly as written
    <!-- runnable: SUB FLAGS; SUB FLAGS --> it runs with FLAGS added to each `dcdit SUB` line of the block: the
                                           documented size flags that keep CI short (e.g. quickstart --steps 4)
    <!-- not runnable: REASON -->          the block is shown, not run (the install, which CI runs as written;
                                           a cluster; the test suite itself)

Runnable blocks run one after another in one bash (`set -eo pipefail`; Python blocks through `.venv/bin/python`),
so that `source .venv/bin/activate` and `cd` carry over as in a terminal, and the first non-zero exit fails the
test. The setting is a fresh clone after the install: a temporary folder holding the repository's `.venv` and
`experiments/` (symbolic links), empty HOME, TORCH_HOME, XDG_CACHE_HOME and TMPDIR, and no network (a user and
network namespace with only the loopback interface, `unshare -rn`).

Afterwards: no file in the folder that the repository's .gitignore does not cover, nothing of dcdit's left in
TMPDIR, the quickstart's findings say that its shortened runs are too short, every MLflow store holds the one
experiment "dcdit" (no empty "Default"), and the outputs the README's walkthrough names are where it says.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*(not runnable|runnable)\s*(?::\s*(.*?))?\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
LANGUAGES = ("bash", "python")
LINKED = (".venv", "experiments")  # what a fresh clone has after the install


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    runnable: bool
    note: str | None  # the reason (not runnable) or the added flags (runnable)


def readme_blocks(text: str) -> list[Block]:
    """The bash and python blocks of a Markdown text with their markers; a block without a marker is refused."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) in LANGUAGES:
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            assert marker, f"README.md line {i + 1}: a {fence.group(1)} block needs <!-- runnable --> or " \
                           "<!-- not runnable: REASON --> on the line before it"
            runnable = marker.group(1) == "runnable"
            assert runnable or marker.group(2), f"README.md line {i}: say why the block is not runnable"
            blocks.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1:end]), runnable, marker.group(2)))
        i = end + 1
    return blocks


def with_flags(block: Block) -> str:
    """The block's text with the marker's flags added to its `dcdit SUB` lines (before a trailing comment)."""
    text = block.text
    for part in filter(None, (p.strip() for p in (block.note or "").split(";"))):
        sub, _, flags = part.partition(" ")
        pattern = re.compile(rf"^(\s*(?:\S*/)?dcdit {re.escape(sub)}\b[^#\n]*?)(\s*#.*)?$", re.MULTILINE)
        text, count = pattern.subn(lambda m: f"{m.group(1)} {flags}{m.group(2) or ''}", text)
        assert count, f"README.md line {block.line}: the marker names `dcdit {sub}`, which the block does not run"
    return text


def shell_script(blocks: list[Block]) -> str:
    """One bash script of the runnable blocks, each announced on stderr so that a failure names its block."""
    parts = ["set -eo pipefail"]
    for n, block in enumerate(b for b in blocks if b.runnable):
        parts.append(f"echo \"### README block {n + 1} (line {block.line}) at ${{SECONDS}} s\" >&2")
        body = with_flags(block)
        if block.language == "python":
            body = f".venv/bin/python - <<'README_PYTHON'\n{body}\nREADME_PYTHON"
        parts.append(body)
    return "\n".join(parts) + "\n"


def test_markers_are_read_and_flags_land_on_the_named_command():
    text = ("<!-- runnable: quickstart --steps 4 --eval-samples 16; eval --num-samples 8 -->\n```bash\n"
            "dcdit quickstart   # about 4 minutes\n.venv/bin/dcdit eval x --seed 1\ndcdit evaluate-not\n```\n"
            "<!-- not runnable: needs a cluster -->\n```bash\nray job submit\n```\n```text\nno marker needed\n```\n")
    first, second = readme_blocks(text)
    assert (first.runnable, second.runnable, second.note) == (True, False, "needs a cluster")
    assert with_flags(first).splitlines() == ["dcdit quickstart --steps 4 --eval-samples 16   # about 4 minutes",
                                              ".venv/bin/dcdit eval x --seed 1 --num-samples 8", "dcdit evaluate-not"]
    with pytest.raises(AssertionError, match="needs <!-- runnable -->"):
        readme_blocks("text\n```bash\nls\n```\n")
    with pytest.raises(AssertionError, match="does not run"):
        with_flags(readme_blocks("<!-- runnable: train --steps 1 -->\n```bash\ndcdit eval x\n```\n")[0])


def _offline_setting(root: Path) -> tuple[Path, dict]:
    """A fresh clone after the install (links to .venv and experiments/) and an environment with empty homes."""
    work = root / "clone"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(REPO / name)
    homes = {key: root / key.lower() for key in ("HOME", "TORCH_HOME", "XDG_CACHE_HOME")}
    for path in homes.values():
        path.mkdir()
    # A short TMPDIR: Ray puts its sockets under it, and a socket path must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TERM", "USER", "LOGNAME")}
    env = {**keep, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **{k: str(v) for k, v in homes.items()},
           "TMPDIR": str(tmp), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    return work, env


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_readme_runs_as_written_offline(tmp_path):
    blocks = readme_blocks((REPO / "README.md").read_text())
    assert sum(b.runnable for b in blocks) >= 3, "the README's walkthrough lost its runnable blocks"
    assert shutil.which("unshare") and shutil.which("ip"), "needs util-linux `unshare` and iproute2 `ip`"
    work, env = _offline_setting(tmp_path)
    (work / "readme.sh").write_text(shell_script(blocks))
    try:
        done = subprocess.run(["unshare", "-rn", "bash", "-c", "ip link set lo up && exec bash readme.sh"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=2300)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"a README block failed (exit {done.returncode}):\n{output[-6000:]}"
        leftovers = sorted(p.name for p in Path(env["TMPDIR"]).iterdir() if p.name.startswith("dcdit"))
    finally:
        shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    (work / "readme.sh").unlink()
    assert leftovers == [], f"temporary files survived the commands: {leftovers}"
    _check_outputs(work, output)


def _check_outputs(work: Path, output: str) -> None:
    # The quickstart ran at 4 steps: its findings say so instead of stating results.
    assert "Too short to mean anything" in output
    assert "synthetic data: FD in the features of the dcdit-synthetic-classifier" in output  # eval's default
    assert "not FID" in output  # fid's offline default, said in one line
    for path in ("dcdit-quickstart/report/report.html", "dcdit-reports/quickstart/report.html",
                 "dcdit-reports/smoke/report.html", "dcdit-runs/smoke-samples-rho0.5.npz",
                 "dcdit-samples/smoke-step12/grid.png", "dcdit-samples/smoke-step12/class0002_seed1.png",
                 "dcdit-runs/smoke-export/model.safetensors"):
        assert (work / path).is_file(), f"{path} is not where the README says"
    samples = re.search(r"samples and boundary maps: (\S+)", output)
    assert samples and any(Path(samples.group(1)).glob("boundary_maps_*.png")), "dcdit train's samples line"
    grids = re.findall(r"sample grid: (\S+)", output)
    assert len(grids) == 2 and all(Path(g).is_file() for g in grids), "dcdit eval's grid lines (one per rho)"
    stores = sorted(work.rglob("mlflow.db"))
    assert {s.parent.name for s in stores} == {"dcdit-quickstart", "dcdit-runs"}
    for store in stores:
        experiments = MlflowClient(f"sqlite:///{store}").search_experiments(view_type=ViewType.ACTIVE_ONLY)
        assert [e.name for e in experiments] == ["dcdit"], store
    # What the commands wrote is covered by the repository's .gitignore: `git status` of a fresh clone stays clean.
    shutil.copy(REPO / ".gitignore", work / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=work, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    assert sorted(line[3:] for line in status) == sorted([".gitignore", *LINKED]), status
