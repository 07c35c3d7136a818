"""Fuzzing the safetensors target (see fuzz/targets.py for its mutations and the oracle)."""

from fuzz.helpers import assert_fuzz_clean, assert_unmutated_succeeds


def test_unmutated_input_succeeds(fuzz_dir):
    assert_unmutated_succeeds("safetensors", fuzz_dir)


def test_mutations_end_in_a_clean_error_or_a_sane_result(fuzz_dir):
    assert_fuzz_clean("safetensors", fuzz_dir)
