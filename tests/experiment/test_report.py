"""A run's report (``fedtransfer.experiment.report``): clear errors for what is not a run."""

from __future__ import annotations

import pytest

from fedtransfer.errors import ConfigError
from fedtransfer.experiment.report import write_report


def test_report_of_a_folder_that_is_not_a_finished_run_is_a_clear_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"summary\.json, metrics\.jsonl, partition\.json missing"
    ):
        write_report(tmp_path)
