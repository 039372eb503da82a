"""The README's usage snippet runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_snippet_runs(capsys: pytest.CaptureFixture[str]) -> None:
    usage = README.read_text().split("## Use", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", usage, re.S)
    assert snippet is not None, "no python snippet under ## Use"
    exec(compile(snippet.group(1), str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.splitlines() == ["(5,)", "(5,)"]
