"""The data tests' corpus: the first MAX_FILES standard-library files (the test file's own
MAX_FILES), built once per test file."""

import pytest

from switchmoe.data import StdlibSource


@pytest.fixture(scope="module")
def data_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    StdlibSource(data_dir=path, max_files=request.module.MAX_FILES).download_and_prepare()
    return path
