"""Fuzzing the tokenizer_json target (see fuzz/targets.py for its mutations and the oracle)."""

from fuzz.helpers import assert_fuzz_clean, assert_unmutated_succeeds


def test_unmutated_input_succeeds(fuzz_dir):
    assert_unmutated_succeeds("tokenizer_json", fuzz_dir)


def test_mutations_end_in_a_clean_error_or_a_sane_result(fuzz_dir):
    assert_fuzz_clean("tokenizer_json", fuzz_dir)


def test_the_tokenizers_reference_reads_the_base_file(fuzz_dir):
    """The oracle is live: `tokenizers` reads the unmutated tokenizer.json and gives lmforge's ids."""
    import lmforge
    from fuzz.helpers import base_of
    from fuzz.targets import SAMPLES, _hf_reference

    base_of("tokenizer_json", fuzz_dir)
    reference = _hf_reference(fuzz_dir / "tokenizer_json-base" / "tokenizer.json")
    assert reference is not None
    tok = lmforge.load_tokenizer(fuzz_dir / "tokenizer_json-base")
    assert [reference.encode(s, add_special_tokens=False).ids for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]
