"""The README's examples run and print what their comments say, the sample table of the
main command matches what it prints, and its two commands are well-formed.

How a comment on a ``print(...)`` line is read (one rule for every example):

* The *claim* is the comment's text up to its first comma outside brackets and quotes; the
  rest is a remark for the reader and is not checked (``# False, promptly`` claims
  ``False``).
* A claim made only of Python literals separated by spaces (``4000``, ``True True``,
  ``40005 True 0``, ``[0, 1]``) is a value: the printed line must be the string literals the
  ``print`` call starts with (a label such as ``"crashed:"``), then the claim, spaces
  collapsed.  Every execution of that ``print`` is checked (a ``print`` in a loop prints the
  same claim each time) and it must have printed at least once.
* Any other comment is prose; it must be listed in ``PROSE`` below (so it is skipped on
  purpose, never by accident), or the test fails.  A ``print`` without a comment claims
  nothing.
"""

from __future__ import annotations

import ast
import io
import json
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
# The pool guide's examples are held to the same rule.
POOL_GUIDE = README.parent / "docs" / "pool.md"
GUIDE_EXAMPLES = re.findall(r"```python\n(.*?)```", POOL_GUIDE.read_text(), flags=re.S)
# So are the ledger guide's, each run in a directory of its own (they write ledgers).
LEDGER_GUIDE = README.parent / "docs" / "ledger.md"
LEDGER_EXAMPLES = re.findall(r"```python\n(.*?)```", LEDGER_GUIDE.read_text(), flags=re.S)

# Comments of README print lines that say something other than the value printed.
PROSE = {
    "lazy input": "says how imap_unordered consumes its input, not what is printed",
}

_FILENAME = "<README example>"
_MARK = "<<README print>> "

# Runs one example (argv[1]) as ``python -c`` would, except that each print() the example
# itself calls is tagged with the line it was called from.  Other output is left as it is.
_RUNNER = f"""
import builtins, json, sys
_print = builtins.print
def _tagged(*args, sep=" ", end="\\n", file=None, flush=False):
    caller = sys._getframe(1)
    if file is not None or caller.f_code.co_filename != {_FILENAME!r}:
        return _print(*args, sep=sep, end=end, file=file, flush=flush)
    text = (" " if sep is None else sep).join(map(str, args))
    sys.stdout.write({_MARK!r} + json.dumps([caller.f_lineno, text]) + "\\n")
    sys.stdout.flush()  # nothing buffered for a forked child to print again
builtins.print = _tagged
exec(compile(sys.argv[1], {_FILENAME!r}, "exec"), vars(sys.modules["__main__"]))
"""


def run_example(code: str, cwd: pathlib.Path | None = None
                ) -> tuple[list[tuple[int, str]], list[str]]:
    """Run ``code`` in a fresh interpreter (in ``cwd``); return what its prints printed, as
    (line, text), and any other line of standard output.  Fails the test if the example
    fails."""
    result = subprocess.run([sys.executable, "-c", _RUNNER, code], capture_output=True,
                            text=True, timeout=60, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    printed, other = [], []
    lines = result.stdout.split("\n")  # not splitlines(): printed text may hold \x1c etc.
    if lines[-1] == "":
        lines.pop()
    for line in lines:
        if line.startswith(_MARK):
            lineno, text = json.loads(line[len(_MARK):])
            printed.append((lineno, text))
        else:
            other.append(line)
    return printed, other


def _top_level_split(text: str, separator: str) -> list[str]:
    """Split ``text`` at each ``separator`` character (or any whitespace for " ") that is
    outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (char == separator or (separator == " " and char.isspace())):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()] if separator == " " else parts


def claim_of(comment: str) -> str | None:
    """The value a print comment claims, or None if the comment is prose (see module doc)."""
    claim = _top_level_split(comment, ",")[0].strip()
    tokens = _top_level_split(claim, " ")
    if not tokens:
        return None
    for token in tokens:
        try:
            ast.literal_eval(token)
        except (ValueError, SyntaxError):
            return None
    return " ".join(tokens)


def _comments(code: str) -> dict[int, str]:
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def expected_prints(code: str) -> tuple[dict[int, str], list[str]]:
    """Map the line of each ``print`` whose comment claims a value to the line it must print;
    also return the problems found in reading the comments (unlisted prose, unsupported
    forms of ``print``)."""
    comments = _comments(code)
    expected: dict[int, str] = {}
    problems: list[str] = []
    for node in ast.walk(ast.parse(code)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "print"):
            continue
        line = node.lineno
        comment = comments.get(line)
        if comment is None:
            continue  # claims nothing
        where = f"line {line} ({code.splitlines()[line - 1].strip()!r})"
        claim = claim_of(comment)
        if claim is None:
            if comment not in PROSE:
                problems.append(f"{where}: comment {comment!r} is neither a value nor listed "
                                "in PROSE")
            continue
        if node.end_lineno != line or node.keywords:
            problems.append(f"{where}: only one-line prints without keywords are checked")
            continue
        labels = []
        for arg in node.args:
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                break
            labels.append(arg.value)
        rest = node.args[len(labels):]
        if not rest or any(isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                           for arg in rest):
            problems.append(f"{where}: string literals may only lead the print's arguments")
            continue
        expected[line] = " ".join([*labels, claim])
    return expected, problems


def check_prints(code: str, printed: list[tuple[int, str]], other: list[str]) -> list[str]:
    """Every problem with what an example printed, compared with its comments: [] if none."""
    expected, problems = expected_prints(code)
    problems += [f"output not printed by the example's own print(): {line!r}"
                 for line in other]
    for line, text in printed:
        if line in expected and " ".join(text.split()) != expected[line]:
            problems.append(f"line {line} printed {text!r}; its comment says "
                            f"{expected[line]!r}")
    ran = {line for line, _ in printed}
    problems += [f"line {line} never printed; its comment says {want!r}"
                 for line, want in sorted(expected.items()) if line not in ran]
    return problems


@pytest.mark.parametrize("code", EXAMPLES + GUIDE_EXAMPLES,
                         ids=[f"example{i}" for i in range(len(EXAMPLES))]
                         + [f"pool-guide{i}" for i in range(len(GUIDE_EXAMPLES))])
def test_readme_example_prints_what_its_comments_say(code: str) -> None:
    printed, other = run_example(code)
    assert check_prints(code, printed, other) == []


@pytest.mark.parametrize("code", LEDGER_EXAMPLES,
                         ids=[f"ledger-guide{i}" for i in range(len(LEDGER_EXAMPLES))])
def test_ledger_guide_example_prints_what_its_comments_say(code: str,
                                                           tmp_path: pathlib.Path) -> None:
    printed, other = run_example(code, cwd=tmp_path)
    assert check_prints(code, printed, other) == []


def test_readme_claims_values_and_lists_its_prose() -> None:
    claims = [expected_prints(code)[0] for code in EXAMPLES]
    assert sum(len(c) for c in claims) >= 9  # the README's nine claims are all read
    comments = {c for code in EXAMPLES for c in _comments(code).values()}
    assert set(PROSE) <= comments, "PROSE lists a comment the README no longer has"


# -- the comparator itself --------------------------------------------------------------


def test_comment_rule() -> None:
    assert claim_of("4000") == "4000"
    assert claim_of("False, promptly") == "False"
    assert claim_of("40005 True 0") == "40005 True 0"
    assert claim_of("[0, 1, 4], the squares") == "[0, 1, 4]"
    assert claim_of("'a, b'") == "'a, b'"
    assert claim_of("lazy input") is None
    assert claim_of("True, but see below") == "True"
    assert claim_of("") is None


def test_comparator_checks_labels_loops_and_prose() -> None:
    code = ('for x in (1, 2):\n'
            '    print("got:", x > 0)  # True, each time\n'
            'print(3)  # lazy input\n'
            'print(4)  # just a remark\n'
            'print(5)\n')
    good = [(2, "got: True"), (2, "got: True"), (3, "3"), (4, "4"), (5, "5")]
    problems = check_prints(code, good, [])
    assert problems == ["line 4 ('print(4)  # just a remark'): comment 'just a remark' is "
                        "neither a value nor listed in PROSE"]
    code = code.replace("  # just a remark", "")
    assert check_prints(code, good, []) == []
    assert check_prints(code, [(2, "got: True"), (2, "got: False")], []) == [
        "line 2 printed 'got: False'; its comment says 'got: True'"]
    assert check_prints(code, [], []) == ["line 2 never printed; its comment says 'got: True'"]
    assert check_prints(code, good, ["stray"]) == [
        "output not printed by the example's own print(): 'stray'"]


def test_comparator_fails_on_an_altered_example() -> None:
    """A real README example, altered to count 4 x 999: it still runs, and the comparator
    reports that it no longer prints the 4000 its comment claims."""
    (original,) = [code for code in EXAMPLES if re.search(r"# 4000$", code, re.M)]
    assert original.count("range(1000)") == 1
    altered = original.replace("range(1000)", "range(999)")
    printed, other = run_example(altered)
    problems = check_prints(altered, printed, other)
    assert len(problems) == 1 and "printed '3996'" in problems[0] and "'4000'" in problems[0]
    # and the untouched example passes the same check
    assert check_prints(original, *run_example(original)) == []


# -- the sample output of the main command ----------------------------------------------


def _columns(row: str) -> list[str]:
    return re.split(r"\s{2,}", row.strip())


def test_readme_race_table_matches_the_main_command() -> None:
    """The sample of ``ipcfork race``: same first line, column headings, guards in the same
    order, and for every guarded run the exact figures and the ``exact`` verdict.  Rates
    (ops/s, vs fastest) and the unguarded run's losses vary from run to run: not compared."""
    sample = TEXT.split("What the main command prints", 1)[1].split("```text\n", 1)[1]
    sample_lines = sample.split("```", 1)[0].splitlines()
    run = subprocess.run([sys.executable, "-m", "ipcfork", "race"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr  # 0: every guarded run was exact
    actual_lines = run.stdout.splitlines()
    assert actual_lines[0] == sample_lines[0]
    assert _columns(actual_lines[1]) == _columns(sample_lines[1])
    headings = _columns(sample_lines[1])
    assert headings == ["guard", "expected", "observed", "lost", "lost %", "ops/s",
                        "vs fastest", "verdict"]
    sample_rows = [dict(zip(headings, _columns(row), strict=True)) for row in sample_lines[2:]]
    actual_rows = [dict(zip(headings, _columns(row), strict=True))
                   for row in actual_lines[2:2 + len(sample_rows)]]
    assert [r["guard"] for r in actual_rows] == [r["guard"] for r in sample_rows]
    assert sample_rows[0]["guard"] == "none" and len(sample_rows) >= 2
    for want, got in zip(sample_rows, actual_rows, strict=True):
        assert got["expected"] == want["expected"], got
        if want["guard"] == "none":
            continue  # the race itself: how many updates it loses varies
        assert want["verdict"] == "exact"  # what the README claims of every guard
        fixed = ("expected", "observed", "lost", "lost %", "verdict")
        assert {k: got[k] for k in fixed} == {k: want[k] for k in fixed}, got
    # the table has no further guard row than the README shows
    following = actual_lines[2 + len(sample_rows):]
    assert not following or not following[0].strip(), following[0]


def test_readme_has_examples_and_both_commands() -> None:
    assert len(EXAMPLES) >= 4
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        block = TEXT.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
        assert block.count("\n") == 1 and "pip install" in block
