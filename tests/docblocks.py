"""The code blocks of our Markdown documents, and how each one is checked.

Every fenced block in README.md and docs/*.md is one of these (tests/test_docs.py runs
them, one document at a time, in order, in a scratch directory of its own):

- ``console``: ``$ command`` lines, each followed by the output it prints. The command
  runs in bash; its stdout and stderr together must match the lines shown (``...`` in a
  line matches any text, a line of only ``...`` any number of lines; no lines shown:
  the output is not checked). It must exit 0, or N when the line ends in ``# exit N``.
  ``cd`` carries over to the next command.
- ``sh``: a bash script (``set -euo pipefail``) that must exit 0.
- ``python``: a script run by the test virtualenv's Python; it must exit 0.
- ``ini``: settings merged into the scratch directory's ``alembic.ini``; the library
  must then accept its settings.
- ``text``: output or log lines shown to the reader, not code.

A comment on the line before a block (a blank line between is allowed) changes that:

- ``<!-- docs: file PATH -->``: the block is written to PATH in the scratch directory
  (for later blocks to use), not run.
- ``<!-- docs: excerpt PATH -->``: an abridged copy of a file of this repository: each
  of its lines, but ``...`` and lines ending in ``# abridged``, appears in that file in
  the same order (indentation included).
- ``<!-- docs: not run: REASON -->``: a block that cannot run here (a Kubernetes
  manifest); the reason is required.

``<!-- docs: sandbox demo -->`` anywhere in a document starts its scratch directory
with a copy of the demo project (``alembic/``, ``alembic.ini``, ``examples/``).
Any other language, or a directive this module does not know, fails the test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RUNNABLE = ("console", "sh", "python", "ini")
SHOWN = ("text",)

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<lang>[\w+-]*)[ \t]*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs:\s*(?P<body>.*?)\s*-->\s*$")
_EXIT = re.compile(r"#\s*exit\s+(?P<code>\d+)\s*$")


class DocError(Exception):
    """A block the harness cannot classify: the document must be fixed."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    """1-based line of the opening fence."""
    lang: str
    text: str
    directive: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def kind(self) -> str:
        """What the test does with it: file, excerpt, not run, or the language."""
        if self.directive.startswith("not run:"):
            return "not run"
        word = self.directive.partition(" ")[0]
        return word or (self.lang if self.lang in RUNNABLE or self.lang in SHOWN else "")

    @property
    def argument(self) -> str:
        """The PATH of ``file``/``excerpt``, the reason of ``not run``."""
        if self.kind == "not run":
            return self.directive.removeprefix("not run:").strip()
        return self.directive.partition(" ")[2].strip()


@dataclass(frozen=True)
class Command:
    line: int
    command: str
    expected: list[str]
    exit_code: int


def parse(path: Path) -> tuple[list[Block], bool]:
    """The document's blocks, and whether it asks for the demo sandbox."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    demo = False
    pending = ""  # a directive waiting for its block
    pending_at = 0
    index = 0

    def unattached() -> DocError:
        return DocError(f"{path.name}:{pending_at + 1}: <!-- docs: {pending} --> is not "
                        "followed by a code block")

    while index < len(lines):
        line = lines[index]
        directive = _DIRECTIVE.match(line)
        if directive:
            body = directive.group("body")
            if body == "sandbox demo":
                demo = True
            else:
                pending, pending_at = body, index
            index += 1
            continue
        if line.lstrip().startswith("~~~"):
            raise DocError(f"{path.name}:{index + 1}: use ``` fences (the docs test reads no ~~~)")
        fence = _FENCE.match(line)
        if not fence:
            if pending and line.strip():
                raise unattached()
            index += 1
            continue
        indent, ticks, lang = fence.group("indent", "fence", "lang")
        opened = index
        body_lines = []
        index += 1
        while index < len(lines) and lines[index].strip() != ticks:
            body_lines.append(lines[index].removeprefix(indent))
            index += 1
        if index >= len(lines):
            raise DocError(f"{path.name}:{opened + 1}: a code block is never closed")
        opening = opened + 1  # 1-based line of the opening fence
        # A directive belongs to the next block; only blank lines may stand between.
        blocks.append(Block(path, opening, lang, "\n".join(body_lines) + "\n", pending))
        pending = ""
        index += 1
    if pending:
        raise unattached()
    for block in blocks:
        _check_classified(block)
    return blocks, demo


def _check_classified(block: Block) -> None:
    if block.directive:
        if block.kind in ("file", "excerpt", "not run") and block.argument:
            return
    elif block.kind:
        return
    if block.directive:
        msg = f"{block.where}: unknown or incomplete directive <!-- docs: {block.directive} -->"
    else:
        msg = (
            f"{block.where}: a ```{block.lang or '(no language)'} block, which the docs test "
            f"cannot run: use one of {', '.join(RUNNABLE + SHOWN)}, or mark it "
            "<!-- docs: not run: REASON -->"
        )
    raise DocError(msg)


def commands(block: Block) -> list[Command]:
    """The ``$ command`` lines of a console block with the output shown after each."""
    result: list[Command] = []
    lines = block.text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith("$ "):
            raise DocError(f"{block.where}: output before the first `$ ` command: {line!r}")
        start = block.line + 1 + index
        command = line[2:]
        while command.endswith("\\") and index + 1 < len(lines):
            index += 1
            command = command + "\n" + lines[index]
        index += 1
        expected = []
        while index < len(lines) and not lines[index].startswith("$ "):
            expected.append(lines[index])
            index += 1
        exit_match = _EXIT.search(command)
        code = int(exit_match.group("code")) if exit_match else 0
        result.append(Command(start, command, expected, code))
    return result


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Each expected line matches one actual line, ``...`` being a wildcard."""
    patterns = [line.rstrip() for line in expected]
    while patterns and not patterns[-1]:
        patterns.pop()
    if not patterns:
        return True
    lines = [line.rstrip() for line in actual]
    while lines and not lines[-1]:
        lines.pop()
    return _match(patterns, lines)


def _match(patterns: list[str], lines: list[str]) -> bool:
    """Dynamic programming over (pattern, line) positions: linear in each, so a long
    output cannot make the check slow, however many ``...`` lines the pattern has."""
    # matches[j]: patterns[i:] match lines[j:], for the current i (filled from the end)
    matches = [False] * len(lines) + [True]
    for pattern in reversed(patterns):
        following = matches
        matches = [False] * (len(lines) + 1)
        for j in range(len(lines), -1, -1):
            if pattern.strip() == "...":  # skip no line here, or one more
                matches[j] = following[j] or (j < len(lines) and matches[j + 1])
            else:
                here = j < len(lines) and _line_matches(pattern, lines[j])
                matches[j] = here and following[j + 1]
    return matches[0]


def _line_matches(pattern: str, line: str) -> bool:
    regex = ".*".join(re.escape(part) for part in pattern.split("..."))
    return re.fullmatch(regex, line) is not None


def excerpt_problem(block: Block, repo: Path) -> str | None:
    """Why the excerpt is not an abridged copy of its file, or None."""
    source = repo / block.argument
    if not source.is_file():
        return f"{block.where}: excerpt of {block.argument}, which does not exist"
    file_lines = source.read_text().splitlines()
    position = 0
    for line in block.text.splitlines():
        if line.strip() == "..." or line.rstrip().endswith("# abridged") or not line.strip():
            continue
        try:
            position = file_lines.index(line, position) + 1
        except ValueError:
            return (
                f"{block.where}: {line!r} is not in {block.argument} (after line {position}); "
                "the excerpt must copy the file's lines in order"
            )
    return None


_LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$")


def _prose(text: str) -> list[str]:
    """The document's lines outside fenced code blocks, with inline code removed."""
    lines, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes for a Markdown file."""
    seen: dict[str, int] = {}
    result = set()
    inside = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            inside = not inside
            continue
        heading = _HEADING.match(line)
        if inside or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group("title").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    """Relative links of the document whose file or heading does not exist."""
    problems = []
    for line in _prose(path.read_text()):
        for match in _LINK.finditer(line):
            target = match.group("target")
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{path.name}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{path.name}: {target}: no such heading in {linked.name}")
    return problems
