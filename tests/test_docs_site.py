"""The documentation site: every page is in the navigation, the API reference covers exactly
the public names, and the examples of the tutorial and the how-to guides run and print what
their comments say (the README's rule, ``test_readme.py``).  ``mkdocs build --strict`` in
``.ci/run`` checks the links and the docstrings it renders."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest
from test_readme import check_prints, run_example

import ipcfork

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SITE_PAGES = [DOCS / "index.md", DOCS / "tutorial.md", *sorted((DOCS / "howto").glob("*.md")),
              DOCS / "dask.md"]
SITE_EXAMPLES = [(page, code) for page in SITE_PAGES
                 for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("page", "code"), SITE_EXAMPLES,
                         ids=[f"{page.relative_to(DOCS)}-{i}"
                              for i, (page, _) in enumerate(SITE_EXAMPLES)])
def test_site_example_prints_what_its_comments_say(page: pathlib.Path, code: str,
                                                   tmp_path: pathlib.Path) -> None:
    if page.name == "dask.md":
        pytest.importorskip("distributed")
    printed, other = run_example(code, cwd=tmp_path)
    assert check_prints(code, printed, other) == []


def _nav_pages() -> set[str]:
    return set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(),
                          flags=re.M))


def test_every_page_is_in_the_navigation_and_every_entry_exists() -> None:
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    nav = _nav_pages()
    assert pages - nav == set(), "pages missing from mkdocs.yml's nav"
    assert nav - pages == set(), "nav entries without a page"


def test_the_reference_documents_exactly_the_public_names() -> None:
    documented = []
    for page in (DOCS / "reference").glob("*.md"):
        documented += re.findall(r"^::: ipcfork\.(\w+)\s*$", page.read_text(), flags=re.M)
    assert len(documented) == len(set(documented)), "a name documented twice"
    assert set(documented) == set(ipcfork.__all__)
    dask = re.findall(r"^::: ipcfork\.dask\.(\w+)\s*$",
                      (DOCS / "reference" / "dask.md").read_text(), flags=re.M)
    assert sorted(dask) == sorted(importlib.import_module("ipcfork.dask").__all__)


def test_the_tutorial_follows_the_talk() -> None:
    headings = re.findall(r"^## \d+\. (.+)$", (DOCS / "tutorial.md").read_text(), flags=re.M)
    assert headings == ["Fork and wait", "Reaping: no zombies, and every ending reported",
                        "Signal handlers", "Race conditions", "Semaphores and mutexes",
                        "Shared memory", "Deadlocks", "Daemons"]
