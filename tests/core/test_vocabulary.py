"""One vocabulary: Python's entry states are the Rust core's, and failed checks are told apart
from states in one place."""

from __future__ import annotations

import pytest

from featstore import _core, errors, vocabulary
from featstore.store import FeatureStore


def test_python_and_rust_list_the_same_states_in_the_same_order():
    assert list(vocabulary.STATES) == list(_core.STATES)


def test_state_subsets_name_only_states():
    for subset in (vocabulary.TODO_STATES, vocabulary.BAD_STATES):
        assert set(subset) <= set(vocabulary.STATES)
    assert set(vocabulary.MISS_ADVICE) <= set(vocabulary.STATES) | {vocabulary.UNREADABLE}


def test_a_failed_check_is_told_from_a_state():
    assert vocabulary.check_error("error: [Errno 13] Permission denied") == "[Errno 13] Permission denied"
    for state in vocabulary.STATES:
        assert vocabulary.check_error(state) is None


@pytest.mark.parametrize("name", ["vggt", "pixel_latent", "dino.v2", "a-b"])
def test_feature_names_that_make_file_names(name):
    assert vocabulary.check_feature_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "a b", "-x", None])
def test_feature_names_that_are_refused(name):
    assert not vocabulary.is_feature_name(name)


def test_core_exceptions_are_the_ones_featstore_errors_exports(tmp_path):
    # Created once in the extension: the class a user catches is the class the core raises.
    with pytest.raises(errors.DataRootError) as info:
        FeatureStore(tmp_path / "absent", "vggt")
    assert isinstance(info.value, OSError)
    assert errors.CorruptEntryError is _core.CorruptEntryError
    assert issubclass(errors.SourceChangedError, errors.FeatstoreError)
    assert errors.PathOutsideRootError.__module__ == "featstore.errors"


def test_a_source_edited_after_it_was_read_is_not_written(tmp_path):
    src = tmp_path / "a.png"
    src.write_bytes(b"image")
    st = src.stat()
    src.write_bytes(b"edited image")
    store = FeatureStore(tmp_path, "f")
    torch = pytest.importorskip("torch")
    with pytest.raises(errors.SourceChangedError, match="changed after it was read"):
        store.write("a.png", {"x": torch.zeros(2)}, expected=(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    assert store.state("a.png") == "missing"
