"""The command-line reference, generated from ``ue_fast.cli.build_parser()``.

An MkDocs hook (``hooks:`` in mkdocs.yml; plain Python, no plugin to install):

- ``on_files`` adds the page ``cli.md`` to the site, generated at build time from the
  parser and never written into docs/: one section per subcommand that ``build_parser()``
  returns (whatever they are when the site is built), with its usage, description and
  every argument's help text as ``--help`` prints it (``%%`` and ``%(default)s`` expanded
  by argparse's own formatter), choices and default. A hand-written docs/cli.md is refused.
- ``on_page_markdown`` replaces a marker ``<!-- ue-fast usage: COMMAND -->`` in any page
  with COMMAND's usage, as ``ue-fast COMMAND --help`` prints it; a marker naming no
  subcommand stops the build.

Without MkDocs: ``python docs/hooks/cli_reference.py [OUT.md]`` prints (or writes) the page.
"""
from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

PAGE = "cli.md"
WIDTH = 100  # columns of the usage blocks (argparse wraps to the terminal otherwise)
MARKER = re.compile(r"<!--\s*ue-fast usage:\s*([A-Za-z0-9_-]+)\s*-->")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def build_parser() -> argparse.ArgumentParser:
    """``ue_fast.cli.build_parser()``, from the installed package or, failing that, this checkout."""
    try:
        from ue_fast.cli import build_parser as build
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from ue_fast.cli import build_parser as build
    return build()


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str | None, argparse.ArgumentParser]]:
    """(name, short help, parser) of every subcommand, in the parser's order (aliases once)."""
    out, seen = [], set()
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, sub in action.choices.items():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            out.append((name, helps.get(name), sub))
    return out


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    try:
        return parser.formatter_class(prog=parser.prog, width=WIDTH)
    except TypeError:  # a formatter class that takes no width
        return parser._get_formatter()


def usage(parser: argparse.ArgumentParser) -> str:
    """The usage lines, as ``--help`` prints them (wrapped at WIDTH columns)."""
    fmt = _formatter(parser)
    fmt.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return _ANSI.sub("", fmt.format_help()).strip()


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An argument's help with ``%(default)s``, ``%(choices)s``, ``%%`` ... expanded as ``--help`` does."""
    if not action.help:
        return ""
    text = _formatter(parser)._expand_help(action)
    return " ".join(_ANSI.sub("", text).split())


def invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """How ``--help`` names the argument: ``-h, --help``, ``--method {ap,...}``, ``input_dir``."""
    return _ANSI.sub("", _formatter(parser)._format_action_invocation(action))


def _md(text: str) -> str:
    """Plain text as Markdown that renders as that text."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def _code(value) -> str:
    text = str(value)
    ticks = "``" if "`" in text else "`"
    return f"{ticks}{text}{ticks}" if text.strip() else f"`{text!r}`"


def _default(action: argparse.Action) -> str | None:
    d = action.default
    if d is argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    if isinstance(d, (list, tuple)) and d and not isinstance(action, argparse._AppendAction):
        return _code(",".join(str(v) for v in d))
    if isinstance(d, (list, tuple)) and not d:
        return "none given"
    return _code(d)


def _argument(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """A list item: the argument as ``--help`` names it, its help, then choices, default and the like."""
    facts = []
    if action.required and action.option_strings:
        facts.append("*Required*")
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        facts.append("*Choices:* " + ", ".join(_code(c) for c in action.choices))
    if action.nargs == argparse.OPTIONAL and action.option_strings:
        facts.append(f"*Without a value:* {_code(action.const)}")
    if isinstance(action, (argparse._AppendAction, argparse._AppendConstAction)):
        facts.append("*Repeatable*")
    default = _default(action)
    optional = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
    if default is not None and optional and not action.required:
        facts.append(f"*Default:* {default}")
    lines = [f"- {_code(invocation(parser, action))}"]
    text = help_text(parser, action)
    if text:
        lines.append(f"  {_md(text)}")
    if facts:
        lines.append("  " + " · ".join(facts))
    return "  \n".join(lines)  # two spaces: a line break within the item


def section(name: str, short: str | None, parser: argparse.ArgumentParser) -> str:
    """One subcommand: heading, summary, usage, description, its arguments by group, hidden ones."""
    lines = [f"## ue-fast {name} {{#{name}}}", ""]
    if short and short is not argparse.SUPPRESS:
        lines += [_md(short[0].upper() + short[1:].rstrip(".")) + ".", ""]
    lines += ["```text", usage(parser), "```", ""]
    if parser.description:
        lines += [_md(" ".join(parser.description.split())), ""]
    for group in parser._action_groups:
        shown = [a for a in group._group_actions if a.help is not argparse.SUPPRESS]
        if not shown:
            continue
        title = group.title or "arguments"
        lines += [f"**{_md(title[0].upper() + title[1:])}**", ""]
        if group.description:
            lines += [_md(" ".join(group.description.split())), ""]
        lines += [_argument(parser, a) for a in shown] + [""]
    hidden = [a for a in parser._actions if a.help is argparse.SUPPRESS and a.option_strings]
    if hidden:
        lines += ["**Accepted but not listed by `--help`**", ""]
        for a in hidden:
            twins = [o for b in parser._actions if b is not a and b.dest == a.dest and b.help is not argparse.SUPPRESS
                     for o in b.option_strings[-1:]]
            same = f"sets what {', '.join(_code(t) for t in twins)} sets" if twins else f"sets `{a.dest}`"
            lines.append(f"- {_code(', '.join(a.option_strings))}: {same}.")
        lines.append("")
    if parser.epilog:
        lines += [_md(" ".join(parser.epilog.split())), ""]
    return "\n".join(lines)


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole page: the top-level command, then one section per subcommand."""
    parser = parser or build_parser()
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - the parser itself imports torch
        gpu = False
    subs = subcommands(parser)
    lines = [
        "# Command-line reference",
        "",
        "<!-- Generated from ue_fast.cli.build_parser() by docs/hooks/cli_reference.py when the site is built. -->",
        "",
        "This page is generated from the parsers of `ue-fast` (`ue_fast.cli.build_parser()`) each time the "
        "documentation is built, so it says what `ue-fast COMMAND --help` prints: usage, description, and every "
        "argument with its help, choices and default. Defaults that follow the machine are shown as on the one "
        "that built this page, which " + ("saw a CUDA device (so `--device` reads `cuda`; without one it is `cpu`)."
                                         if gpu else "saw no CUDA device (so `--device` reads `cpu`; "
                                         "where torch sees a GPU it is `cuda`)."),
        "",
        "```text",
        usage(parser),
        "```",
        "",
    ]
    if parser.description:
        lines += [_md(" ".join(parser.description.split())), ""]
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [`{n}`](#{n}) | {_md(h) if h and h is not argparse.SUPPRESS else ''} |" for n, h, _ in subs]
    lines.append("")
    lines += [section(n, h, p) for n, h, p in subs]
    return "\n".join(lines).rstrip() + "\n"


def covered_options(parser: argparse.ArgumentParser | None = None) -> dict[str, list[str]]:
    """Every subcommand and its option strings (hidden ones included): what the page must name."""
    parser = parser or build_parser()
    return {n: [o for a in p._actions for o in a.option_strings] for n, _, p in subcommands(parser)}


# ---- MkDocs events -------------------------------------------------------------------------

_parser_cache: list[argparse.ArgumentParser] = []


def _parser() -> argparse.ArgumentParser:
    if not _parser_cache:
        _parser_cache.append(build_parser())
    return _parser_cache[0]


def on_pre_build(config, **kwargs):
    _parser_cache.clear()


def on_files(files, config, **kwargs):
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    if files.get_file_from_path(PAGE) is not None:
        raise PluginError(f"docs/{PAGE} is generated from ue_fast.cli.build_parser() at build time: "
                          "remove the file from docs/")
    files.append(File.generated(config, PAGE, content=render(_parser())))
    return files


def on_page_markdown(markdown, page, config, files, **kwargs):
    from mkdocs.exceptions import PluginError

    subs = {n: p for n, _, p in subcommands(_parser())}

    def replace(m: re.Match) -> str:
        name = m.group(1)
        if name not in subs:
            raise PluginError(f"{page.file.src_uri}: usage marker names {name!r}, which is no subcommand of "
                              f"ue-fast (they are: {', '.join(subs)})")
        return "```text\n" + usage(subs[name]) + "\n```"

    return MARKER.sub(replace, markdown)


if __name__ == "__main__":
    page = render()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(page)
    else:
        sys.stdout.write(page)
