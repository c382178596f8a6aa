"""The README and docs/ as a reader uses them: every command they show composes, the
configuration table names every option there is, and the front door stays short."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from cifarkit.run.cli import compose
from cifarkit.run.resolvers import register_resolvers
from cifarkit.run.schema import check

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("train.py", "eval.py", "predict.py", "export.py", "serve.py")
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")  # <ckpt>, <full set>, <run>: what the reader fills in


def fenced_lines(text: str) -> list[str]:
    """Shell lines of ```bash blocks, continuations joined and comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [
            re.split(r"\s#", line)[0].strip().removesuffix(" &")
            for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    return lines


def commands(text: str) -> list[str]:
    """Every entry-point command a page shows: in bash blocks and in inline code."""
    inline = re.findall(r"`(python [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [c for c in fenced_lines(text) + inline if any(f"{s} " in f"{c} " for s in SCRIPTS)]


def entry_point(command: str) -> tuple[str, list[str]]:
    """The script a command runs and its arguments, placeholders filled with a dummy value."""
    words = shlex.split(PLACEHOLDER.sub("x", command))
    i = next(i for i, w in enumerate(words) if Path(w).name in SCRIPTS)
    return Path(words[i]).stem, [w for w in words[i + 1 :] if w != "..."]  # "...": any further options


def all_commands() -> list[tuple[str, str]]:
    return [(page.name, c) for page in PAGES for c in commands(page.read_text())]


def test_pages_show_commands() -> None:
    """The collector finds what the pages show (else the test below would check nothing)."""
    found = {page for page, _ in all_commands()}
    assert {"README.md", "accuracy.md", "serving.md", "scale-out.md"} <= found, found
    assert any("experiment=cpu10" in c for _, c in all_commands())


def first_values(args: list[str]) -> list[str] | None:
    """A command line's overrides as one run of it: each sweep replaced by its first value (a sweeper's own
    ranges, such as interval(), left to the sweeper); None for a command with Hydra's flags (tests/test_cli.py)."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None
    out = []
    for o in OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")]):
        if not o.is_sweep_override():
            out.append(o.input_line)
        elif o.value_type.name != "INTERVAL_SWEEP":  # interval() has no first value: the sweeper samples it
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
    return out


@pytest.mark.parametrize(("page", "command"), all_commands())
def test_every_command_composes(page: str, command: str) -> None:
    """Each override of each shown command exists: the shell's own composition of a single run."""
    register_resolvers()
    name, args = entry_point(command)
    if (overrides := first_values(args)) is not None:
        cfg = compose(ROOT / "configs", name, overrides)
        if cfg.hydra.mode != RunMode.MULTIRUN:  # a search's config resolves in its sweeper
            check(cfg)


def test_the_configuration_table_names_every_option() -> None:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w/]+)` \|([^|]*)\|", table, flags=re.M)}
    configs = ROOT / "configs"
    groups = {str(d.relative_to(configs)) for d in configs.rglob("*") if d.is_dir() and d.name != "common"}
    for group in groups:
        options = {f.stem for f in (configs / group).glob("*.yaml")}
        if not options:
            continue
        assert group in rows, f"README's configuration table has no row for {group}"
        missing = {o for o in options if f"`{o}`" not in rows[group]}
        assert not missing, f"{group}: {missing} not in the README's table"


def test_the_front_door_is_short_and_refers_to_nothing_outside() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = [
        f
        for f in tracked
        if f != ".ci/run"
        and not f.startswith("tests/")
        and (ROOT / f).is_file()
        and "../shared" in (ROOT / f).read_text(errors="replace")
    ]
    assert not outside, outside


def test_every_page_link_resolves() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"
