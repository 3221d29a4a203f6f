"""errors.py: the one-line form of an error and the failure wrapper every command runs in."""

from __future__ import annotations

import pytest

from transferlab.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, DataError, describe, first_line, run_reporting_errors


class KeyedError(Exception):
    full_key = "data.source"


def test_first_line_folds_whitespace_and_names_the_full_key() -> None:
    assert first_line(ValueError("  bad   value\n  Traceback detail\n")) == "bad value"
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(KeyedError("Missing mandatory value: source")) == "Missing mandatory value: source (data.source)"
    assert describe(DataError("x.csv not found\nmore")) == "DataError: x.csv not found"


def test_wrapper_turns_errors_into_one_line_and_an_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_reporting_errors(lambda: 0) == 0

    def fails() -> int:
        raise DataError("no images\nsecond line")

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_reporting_errors(fails) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "DataError: no images\n"
    assert run_reporting_errors(interrupted) == EXIT_INTERRUPTED
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error: its traceback shows
        run_reporting_errors(lambda: 1 // 0)
