"""The README's examples run, so the README cannot rot; its two commands are well-formed."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_readme_has_examples_and_both_commands() -> None:
    assert len(EXAMPLES) >= 4
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        block = TEXT.split(marker, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
        assert block.count("\n") == 1 and "pip install" in block
