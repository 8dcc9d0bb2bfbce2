import shutil
import tempfile

import pytest


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Engine tests make cache dirs with tempfile: keep them under this test's tmp dir and
    remove them afterwards, whatever happens."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)
