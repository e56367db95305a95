"""The README and the documentation pages run: every ```python block is executed.

A page's blocks run in order in one namespace, so a later block uses the names
of an earlier one. A block whose lines start with ``>>>`` is a doctest: the
output it shows is compared. Other blocks state what they show with asserts.
An HTML comment on the line before a block changes how it runs:

- ``<!-- docs-test: torchrun N -->``: the block is a script, run on N gloo
  processes by torchrun (it needs a process group of its own);
- ``<!-- docs-test: skip REASON -->``: not run here, for the reason given (a
  GPU, say). Such blocks are few, and each names its reason.

Shell blocks (```bash) are commands to type, not run here: the make targets,
``python -m bench`` subcommands and ``nwfast`` subcommands they name must exist.
Relative links of the README must point at files of the repository (mkdocs
--strict checks those of docs/).
"""

import argparse
import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_SKIPPED = 3

FENCE = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<directive>[^>]*?)\s*-->\s*\n)?"
    r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```\s*$",
    re.M | re.S,
)


class Block:
    def __init__(self, page, match):
        self.page = page
        self.info = match["info"].strip()
        self.language = self.info.split(" ", 1)[0]
        self.body = match["body"]
        self.directive = (match["directive"] or "").strip()
        self.line = page.read_text()[: match.start("body")].count("\n") + 1

    @property
    def where(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page, language=None):
    found = [Block(page, m) for m in FENCE.finditer(page.read_text())]
    return [b for b in found if language is None or b.language == language]


def _id(page):
    return str(page.relative_to(ROOT))


def _directive_kind(block):
    return block.directive.split(" ", 1)[0] if block.directive else "run"


def _run_doctest(block, namespace):
    """The block's examples against the output it shows; the report of any mismatch."""
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.body, namespace, block.where, str(block.page), block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    runner.run(test, out=report.append, clear_globs=False)
    namespace.update(test.globs)
    return "".join(report)


def _run_torchrun(block, tmp_path):
    processes = int(block.directive.split()[1])
    script = tmp_path / "script.py"
    script.write_text(block.body)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port of its own
        "--nproc-per-node",
        str(processes),
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{block.where}: {result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """Every python block of the page runs, in order, in one namespace, from the
    repository root (a block may read bench/results)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {"__name__": f"docs_{page.stem}"}
    for block in blocks(page, "python"):
        kind = _directive_kind(block)
        if kind == "skip":
            continue
        if kind == "torchrun":
            _run_torchrun(block, tmp_path)
            continue
        assert kind == "run", f"{block.where}: unknown directive {block.directive!r}"
        if block.body.lstrip().startswith(">>>"):
            report = _run_doctest(block, namespace)
            assert not report, report
        else:
            code = compile(block.body, block.where, "exec")
            exec(code, namespace)


def test_skipped_blocks_are_few_and_say_why():
    skipped = [b for page in PAGES for b in blocks(page, "python") if _directive_kind(b) == "skip"]
    for block in skipped:
        reason = block.directive.split(" ", 1)[1:] or [""]
        assert len(reason[0].split()) >= 3, f"{block.where}: a skipped block says why"
    assert len(skipped) <= MAX_SKIPPED, [b.where for b in skipped]


def test_every_block_has_a_language():
    for page in PAGES:
        for block in blocks(page):
            assert block.language, f"{block.where}: a code block names its language"
            assert block.language in ("python", "bash", "text", "json"), block.where


def _make_targets():
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*):", text, re.M))


def _subcommands(argparser):
    actions = [a for a in argparser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub for action in actions for name, sub in action.choices.items()}


def _bench_subcommands():
    from bench.cli import parser

    return _subcommands(parser())


def _options(argparser):
    return {opt for action in argparser._actions for opt in action.option_strings}


def _commands(text):
    """The command lines of a shell block: comments and continuations dropped."""
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line.split()


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_shell_commands_name_what_exists(page, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    targets = _make_targets()
    bench = _bench_subcommands()
    from nwfast.cli import build_parser

    nwfast_commands = _subcommands(build_parser())
    for block in blocks(page, "bash"):
        for words in _commands(block.body):
            if words[0] == "make":
                named = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
                missing = set(named or ["bench"]) - targets
                assert not missing, f"{block.where}: no make target {missing}"
            elif words[:3] == ["python", "-m", "bench"] and len(words) > 3:
                sub = bench.get(words[3])
                assert sub is not None, f"{block.where}: no bench subcommand {words[3]}"
                options = {w.split("=")[0] for w in words[4:] if w.startswith("--")}
                assert options <= _options(sub), f"{block.where}: {options - _options(sub)}"
            elif words[0] == "nwfast" or words[:3] == ["python", "-m", "nwfast"]:
                rest = words[1:] if words[0] == "nwfast" else words[3:]
                sub = nwfast_commands.get(rest[0])
                assert sub is not None, f"{block.where}: no nwfast subcommand {rest[0]}"
                options = {w for w in rest[1:] if w.startswith("--")}
                assert options <= _options(sub), f"{block.where}: {options - _options(sub)}"
            elif words[0] in ("bench/gpu_suite.sh", ".ci/run"):
                assert (ROOT / words[0]).exists(), block.where


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_links_point_at_files():
    for target in LINK.findall((ROOT / "README.md").read_text()):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
