"""Every bad input of tests/reliability.py stops with an error naming what is wrong, and the
reliability tables of docs/reliability.md are exactly what tests/reliability.py generates from the tests."""

from __future__ import annotations

import pytest
import reliability as R


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = []
    for i, case in enumerate(R.BAD_INPUTS):
        folder = tmp_path_factory.mktemp(f"bad{i}")
        code, text = R.run(case, folder)
        out.append((case, code, R.error_line(text, folder), folder))
    return out


def test_every_bad_input_stops_with_an_error_that_names_it(rows):
    for case, code, line, folder in rows:
        assert code != 0, f"{case.what}: exit code 0"
        assert case.names in line, f"{case.what}: the error does not name {case.names!r}: {line!r}"
        assert "Traceback" not in line
        assert not (folder / "unpickled").exists(), f"{case.what}: a file was unpickled"


def test_readme_reliability_tables_are_generated(rows):
    block = R.render([(case, code, line) for case, code, line, _ in rows])
    assert R.readme_block(R.DOC.read_text()) == block, (
        "docs/reliability.md is stale: run `python tests/reliability.py --write`"
    )
