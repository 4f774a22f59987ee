"""What `dcdit ... --help` tells a user agrees with what the commands do and with the README: the override examples
of `dcdit resume` are ones it accepts, the default image size is the one the shipped configs train at, and the
quickstart's measured duration is the same number in its help and in the README."""

from __future__ import annotations

import re
from pathlib import Path

from dcdit_platform.cli import build_parser
from dcdit_platform.config import apply_overrides, build_config, load_yaml_tree, science_diff
from dcdit_platform.config.sections import DEFAULT_IMAGE_SIZE

REPO = Path(__file__).resolve().parents[2]


def _help(command: str) -> str:
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if a.dest == "command"]  # noqa: SLF001 - argparse has no public API
    return " ".join(subparsers.choices[command].format_help().split())


def _science_changed_by(examples: list[str]) -> list[str]:
    tree = load_yaml_tree(REPO / "experiments" / "smoke.yaml")
    before = build_config(tree).science_dict()
    return science_diff(before, build_config(apply_overrides(tree, examples)).science_dict())


def test_resume_help_shows_overrides_that_resume_accepts():
    resume = re.findall(r"-o ([a-z_.]+=\S+)", _help("resume"))
    train = re.findall(r"-o ([a-z_.]+=\S+)", _help("train"))
    assert resume and _science_changed_by(resume) == []  # resume keeps the science: these examples work
    assert _science_changed_by(train) == ["train.lr"]  # train's own example changes it, so resume must not show it


def test_the_default_synthetic_image_size_is_the_one_the_shipped_configs_use():
    assert f"default {DEFAULT_IMAGE_SIZE}," in _help("prepare-data")
    for config in ("smoke.yaml", "quickstart/experiment.yaml"):
        assert load_yaml_tree(REPO / "experiments" / config)["data"]["image_size"] == DEFAULT_IMAGE_SIZE


def test_the_quickstart_duration_is_one_measured_number_in_help_and_readme():
    measured = re.search(r"Measured on the project's 2-core CPU machine: ([^.]+)\.", _help("quickstart"))
    assert measured, "dcdit quickstart --help states its measured duration"
    readme = " ".join((REPO / "README.md").read_text().split())
    assert measured.group(1) in readme
