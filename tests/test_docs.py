"""Every code block of the README and docs/ runs, or says why it cannot.

Each document runs as one test: its blocks in order, in a scratch directory of its own,
with this virtualenv's commands first on PATH, the way a reader would follow it. What a
block kind means is in tests/docblocks.py.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import DEMO_REVISIONS, REPO
from docblocks import (
    Block,
    DocError,
    broken_links,
    commands,
    excerpt_problem,
    output_matches,
    parse,
)

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_TIMEOUT_S = 180


def _fail(message: str) -> None:
    """Raised as it is: pytest would re-indent the output of a failing assert."""
    raise AssertionError(message)


def _ids(path: Path) -> str:
    return str(path.relative_to(REPO))


class Reader:
    """Follows one document in its scratch directory."""

    def __init__(self, sandbox: Path) -> None:
        self.sandbox = sandbox
        self.cwd = sandbox
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        self.env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
        self.env.pop("ALEMBIC_CONFIG", None)
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"

    def run(self, block: Block) -> None:
        kind = block.kind
        if kind == "file":
            target = self.cwd / block.argument
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text)
        elif kind == "excerpt":
            problem = excerpt_problem(block, REPO)
            if problem is not None:
                _fail(problem)
        elif kind == "console":
            for command in commands(block):
                self._console(block, command.line, command.command, command.expected,
                              command.exit_code)
        elif kind == "sh":
            self._script(block, ["bash", "-c", "set -euo pipefail\n" + block.text])
        elif kind == "python":  # from standard input: imports find the current directory
            self._script(block, [sys.executable, "-"], stdin=block.text)
        elif kind == "ini":
            self._merge_ini(block)
        # "text" and "not run" blocks are for the reader only

    def _console(self, block: Block, line: int, command: str, expected: list[str],
                 exit_code: int) -> None:
        # Where the command leaves its shell: a file outside the reader's folders.
        handle, cwd_file = tempfile.mkstemp(prefix="docs-cwd-")
        os.close(handle)
        wrapped = f'set -o pipefail\n{command}\nstatus=$?\npwd > "{cwd_file}"\nexit $status'
        try:
            result = subprocess.run(  # one stream, in the order a terminal would show it
                ["bash", "-c", wrapped], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=COMMAND_TIMEOUT_S, check=False,
            )
            left_in = Path(cwd_file).read_text().strip()
        finally:
            os.unlink(cwd_file)
        if left_in:  # `cd` carries over, as in the reader's shell
            self.cwd = Path(left_in)
        printed = result.stdout.splitlines()
        shown = "\n".join(printed)
        where = f"{block.path.name}:{line}: $ {command}"
        if result.returncode != exit_code:
            _fail(f"{where}\nexited {result.returncode}, the document says {exit_code}:\n{shown}")
        if not output_matches(expected, printed):
            _fail(f"{where}\nthe document shows:\n" + "\n".join(expected)
                  + f"\nit printed:\n{shown}")

    def _script(self, block: Block, argv: list[str], stdin: str | None = None) -> None:
        result = subprocess.run(
            argv, cwd=self.cwd, env=self.env, input=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
        )
        if result.returncode != 0:
            _fail(f"{block.where}: the {block.lang} block exited {result.returncode}:\n"
                  f"{textwrap.indent(block.text, '    ')}\n{result.stdout}")

    def _merge_ini(self, block: Block) -> None:
        ini = self.cwd / "alembic.ini"
        if not ini.exists():
            _fail(f"{block.where}: an ini block, but there is no {ini.name} here")
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(ini)
        parser.read_string(block.text, source=block.where)
        with ini.open("w") as file:
            parser.write(file)
        check = (
            "from alembic.config import Config\n"
            "from alembic_sqlite_lock._settings import resolve_settings\n"
            "resolve_settings(Config('alembic.ini'))\n"
        )
        self._script(block, [sys.executable, "-c", check])

    def stop_leftovers(self) -> None:
        """Servers a document started and forgot (it should stop them itself)."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if Path(cwd).is_relative_to(self.sandbox):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids)
def test_every_block_of_the_document_runs(document: Path, tmp_path: Path) -> None:
    blocks, demo = parse(document)
    sandbox = tmp_path / "reader"
    sandbox.mkdir()
    if demo:
        shutil.copytree(REPO / "alembic", sandbox / "alembic",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "alembic.ini", sandbox / "alembic.ini")
        shutil.copytree(REPO / "examples", sandbox / "examples",
                        ignore=shutil.ignore_patterns("__pycache__", "*.db*"))
    reader = Reader(sandbox)
    try:
        for block in blocks:
            reader.run(block)
    finally:
        reader.stop_leftovers()


def test_docs_exist_for_each_kind() -> None:
    """The tutorial, the how-to guides, the reference and the design explanation."""
    names = {path.name for path in DOCUMENTS}
    assert {"tutorial.md", "how-to.md", "reference.md", "design.md"} <= names


# The harness itself: a docs test that cannot fail would prove nothing.


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(textwrap.dedent(text))
    return path


def test_an_unmarked_block_of_another_language_is_refused(tmp_path: Path) -> None:
    doc = _write(tmp_path, """
        Intro.

        ```yaml
        kind: Deployment
        ```
    """)
    with pytest.raises(DocError, match=r"doc.md:4: a ```yaml block.*not run: REASON"):
        parse(doc)


def test_not_run_needs_a_reason_and_attaches_across_one_blank_line(tmp_path: Path) -> None:
    doc = _write(tmp_path, """
        <!-- docs: not run: needs a cluster -->

        ```yaml
        kind: Deployment
        ```
    """)
    (block,), demo = parse(doc)
    assert (block.kind, block.argument, demo) == ("not run", "needs a cluster", False)
    with pytest.raises(DocError, match="incomplete directive"):
        parse(_write(tmp_path, "<!-- docs: not run: -->\n```yaml\nx: 1\n```\n"))
    with pytest.raises(DocError, match="unknown or incomplete directive"):
        parse(_write(tmp_path, "<!-- docs: not anything -->\n```yaml\nx: 1\n```\n"))


def test_a_directive_must_stand_right_before_its_block(tmp_path: Path) -> None:
    with pytest.raises(DocError, match=r"doc.md:1: <!-- docs: file x.py --> is not followed"):
        parse(_write(tmp_path, "<!-- docs: file x.py -->\nSome prose.\n```python\n```\n"))
    with pytest.raises(DocError, match="is not followed by a code block"):
        parse(_write(tmp_path, "Text.\n<!-- docs: file x.py -->\n"))
    with pytest.raises(DocError, match="use ``` fences"):
        parse(_write(tmp_path, "~~~python\nprint(1)\n~~~\n"))


def test_console_output_is_compared_and_the_exit_code_checked(tmp_path: Path) -> None:
    doc = _write(tmp_path, """
        ```console
        $ echo one; echo two
        one
        ...
        $ false  # exit 1
        ```
    """)
    (block,), _ = parse(doc)
    (first, second) = commands(block)
    assert (first.expected, first.exit_code, second.exit_code) == (["one", "..."], 0, 1)
    reader = Reader(tmp_path)
    reader.run(block)  # passes
    wrong = _write(tmp_path, "```console\n$ echo one\nthree\n```\n")
    with pytest.raises(AssertionError, match="the document shows:\nthree\nit printed:\none"):
        reader.run(parse(wrong)[0][0])
    failing = _write(tmp_path, "```console\n$ false\n```\n")
    with pytest.raises(AssertionError, match="exited 1, the document says 0"):
        reader.run(parse(failing)[0][0])


def test_cd_carries_over_and_file_blocks_are_written(tmp_path: Path) -> None:
    doc = _write(tmp_path, """
        ```console
        $ mkdir app && cd app
        ```
        <!-- docs: file hello.txt -->
        ```text
        hi
        ```
        ```console
        $ cat hello.txt
        hi
        ```
    """)
    reader = Reader(tmp_path)
    for block in parse(doc)[0]:
        reader.run(block)
    assert (tmp_path / "app" / "hello.txt").read_text() == "hi\n"


def test_output_patterns() -> None:
    wild = ["...", "a", "...", "b", "...", "c", "..."]
    assert output_matches(wild, ["x"] * 2000 + ["a", "b", "c"])  # quick, however long
    assert not output_matches(wild, ["x"] * 2000)
    assert output_matches(["a ... c"], ["a b c"])
    assert output_matches(["...", "z"], ["x", "y", "z"])
    assert output_matches([], ["anything"])
    assert not output_matches(["a"], ["a", "b"])
    assert not output_matches(["a b"], ["a c"])


def test_an_excerpt_must_copy_its_file_in_order(tmp_path: Path) -> None:
    doc = _write(tmp_path, """
        <!-- docs: excerpt alembic/env.py -->
        ```python
        from alembic import context
        ...
        run_migrations(context, target_metadata)
        ```
        <!-- docs: excerpt alembic/env.py -->
        ```python
        run_migrations(context, target_metadata)
        from alembic import context
        ```
    """)
    good, bad = parse(doc)[0]
    assert excerpt_problem(good, REPO) is None
    problem = excerpt_problem(bad, REPO)
    assert problem is not None
    assert "'from alembic import context' is not in alembic/env.py" in problem


def test_an_ini_block_with_an_unknown_setting_fails(tmp_path: Path) -> None:
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = x\n")
    doc = _write(tmp_path, "```ini\n[alembic_sqlite_lock]\ndeadline = 5\n```\n")
    with pytest.raises(AssertionError, match="deadline"):
        Reader(tmp_path).run(parse(doc)[0][0])


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids)
def test_every_relative_link_and_anchor_exists(document: Path) -> None:
    assert broken_links(document) == []


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    doc = _write(tmp_path, """
        # A heading

        [fine](#a-heading), [gone](#no-heading), [missing](nowhere.md),
        `[in code](nowhere.md)`, [web](https://example.org/x).
    """)
    assert broken_links(doc) == [
        "doc.md: #no-heading: no such heading in doc.md",
        "doc.md: nowhere.md: no such file",
    ]


def test_the_demo_prints_who_applied_what() -> None:
    """What `make demo` runs (the README's first command): 8 real `alembic` processes
    released at once on a fresh file, and the report the README shows."""
    bin_dir = str(Path(sys.executable).parent)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--workers", "8"],
        env=dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"),
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    workers = [line for line in result.stdout.splitlines() if line.startswith("worker ")]
    assert len(workers) == 8
    applied = [line for line in workers
               if line.endswith("exit 0: applied 8 migrations: " + " ".join(DEMO_REVISIONS))]
    assert len(applied) == 1, result.stdout
    others = {line.split(": ", 1)[1] for line in workers if line not in applied}
    assert others <= {
        "waited for the lock, then found the work done by another worker",
        "found the database already at head (no lock taken)",
    }, result.stdout
    assert result.stdout.rstrip().endswith(
        "Final revision: 0008; the data migration 0005 ran 1 time(s) and seeded 3 tags; "
        "0 worker(s) failed."
    )
