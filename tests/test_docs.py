"""The documentation: the CLI reference generated from the parsers, the short README, mkdocs.yml's nav.

Fast (seconds) and without MkDocs; only the check of the hook's MkDocs events needs it and is
skipped, with the reason, where it is not installed (``.ci/docs_check.sh`` builds the whole site).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from ue_fast.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HOOK = DOCS / "hooks" / "cli_reference.py"
README = ROOT / "README.md"
COMMANDS = (
    "pip install torch==2.13.0 ninja wheel && pip install -e . --no-build-isolation && ue-fast demo",
    'pip install torch==2.13.0 ninja wheel && pip install -e ".[test]" --no-build-isolation && pytest -n auto',
)


def _hook():
    spec = importlib.util.spec_from_file_location("ue_fast_docs_cli_reference", HOOK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _sections(page: str) -> dict[str, str]:
    """The page's text per ``## ue-fast NAME`` section."""
    parts = re.split(r"^## ue-fast ([A-Za-z0-9_-]+) \{#[A-Za-z0-9_-]+\}$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_covers_every_subcommand_and_option():
    hook, parser = _hook(), build_parser()
    page = hook.render(parser)
    sections = _sections(page)
    subs = _subparsers(parser)
    assert list(sections) == list(subs)
    for name, sub in subs.items():
        text = sections[name]
        assert f"usage: ue-fast {name} " in text
        for action in sub._actions:
            for opt in action.option_strings:  # hidden ones (help=SUPPRESS) included
                assert re.search(rf"[` ]{re.escape(opt)}[ ,`]", text), f"ue-fast {name}: {opt} is not on the page"
            if not action.option_strings:
                assert f"- `{action.metavar or action.dest}`" in text, f"ue-fast {name}: {action.dest}"
            if action.choices is not None:
                for choice in action.choices:
                    assert f"`{choice}`" in text, f"ue-fast {name} {action.option_strings}: choice {choice}"
    assert hook.covered_options(parser) == {
        n: [o for a in s._actions for o in a.option_strings] for n, s in subs.items()}
    # help strings as --help shows them: %(default)s and %% expanded
    assert "%(" not in page and "%%" not in page
    assert "the K% most salient pixels" in sections["protect"]


def test_cli_reference_follows_the_parser_it_is_given():
    """Subcommands and flags added to build_parser() show up with no change to the generator."""
    hook, parser = _hook(), build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    new = action.add_parser("zz-new", help="a subcommand made by the test")
    new.add_argument("--zz-flag", choices=["a", "b"], default="b", help="pick one (default %(default)s, 100%%)")
    page = hook.render(parser)
    text = _sections(page)["zz-new"]
    assert "A subcommand made by the test." in text and "`--zz-flag {a,b}`" in text
    assert "pick one (default b, 100%)" in text and "*Default:* `b`" in text


def test_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the details belong in docs/"
    first_block = text.split("```")[1]  # the first code block, where CI greps the test command
    for cmd in COMMANDS:
        assert f"\n{cmd}\n" in first_block, f"README's first code block lost: {cmd}"
    assert "--preset cpu-small" in "\n".join(lines[:60]), "CPU users should meet --preset cpu-small early"


def _readme_commands() -> list[str]:
    """Every ``ue-fast ...`` command in README's bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" #")[0].strip()
            if cmd.startswith("ue-fast "):
                out.append(cmd)
    return out


def test_readme_commands_parse():
    cmds = _readme_commands()
    assert {c.split()[1] for c in cmds} >= {"protect", "evaluate", "report", "export-apbench"}
    for cmd in cmds:
        try:
            build_parser().parse_args(shlex.split(cmd)[1:])
        except SystemExit:
            pytest.fail(f"README.md shows a command that ue-fast refuses: {cmd}")


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def _nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav lists (read without YAML: every ``x.md`` after ``nav:``)."""
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config.split("\nnav:\n", 1)[1]
    return re.findall(r":\s*\"?([A-Za-z0-9_./-]+\.md)\"?\s*$", nav, flags=re.M)


def test_every_page_is_in_the_nav():
    hook = _hook()
    nav = _nav_pages()
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert pages, "no pages in docs/"
    assert sorted(set(nav) - {hook.PAGE}) == pages, "docs/ pages and mkdocs.yml's nav differ"
    assert len(nav) == len(set(nav))
    assert hook.PAGE in nav, "the generated CLI reference is not in the nav"
    assert not (DOCS / hook.PAGE).exists(), f"docs/{hook.PAGE} is generated at build time, not committed"
    assert "docs/hooks/cli_reference.py" in (ROOT / "mkdocs.yml").read_text()


def test_usage_markers_name_subcommands():
    hook = _hook()
    subs = set(_subparsers(build_parser()))
    markers = [(p.name, m) for p in DOCS.rglob("*.md") for m in hook.MARKER.findall(p.read_text())]
    assert markers
    for page, name in markers:
        assert name in subs, f"docs/{page}: usage marker for {name!r}, which is no subcommand"


def test_hook_events_under_mkdocs(tmp_path):
    pytest.importorskip("mkdocs", reason="MkDocs is not installed (pip install -r docs/requirements.txt)")
    from mkdocs.config import load_config
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import Files

    hook = _hook()
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path))  # loads the hook as MkDocs does
    assert any(str(HOOK) in str(key) or "cli_reference" in str(key) for key in config.plugins), config.plugins
    config.plugins.on_pre_build(config=config)
    files = config.plugins.on_files(Files([]), config=config)
    (page,) = [f for f in files if f.src_uri == hook.PAGE]
    assert page.content_string == hook.render(build_parser())

    class Page:  # what on_page_markdown reads of a page
        class file:
            src_uri = "x.md"

    run = config.plugins.on_page_markdown
    out = run("a\n<!-- ue-fast usage: check -->\nb", page=Page, config=config, files=files)
    assert "```text\nusage: ue-fast check [-h]" in out
    with pytest.raises(PluginError, match="no subcommand"):
        run("<!-- ue-fast usage: nope -->", page=Page, config=config, files=files)
