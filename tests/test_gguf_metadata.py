"""quantloop's fast GGUF header reader against gguf-py's GGUFReader."""

from gguf import GGUFReader

from quantloop.backends.gguf import quantize_gguf
from quantloop.gguf.llamacpp import file_type_name, nominal_bits_of, read_metadata


def test_header_reader_matches_gguf_py(tiny_prepared, tmp_path):
    q = quantize_gguf(tiny_prepared / "tiny-f16.gguf", tmp_path / "q4_k_m.gguf", "Q4_K_M")
    for path in (tiny_prepared / "tiny-f16.gguf", q):
        mine = read_metadata(path)
        ref = GGUFReader(str(path))
        assert mine.architecture == ref.fields["general.architecture"].contents() == "llama"
        assert mine.file_type == ref.fields["general.file_type"].contents()
        assert [(t.name, t.type, t.n_elements, t.n_bytes) for t in mine.tensors] == [
            (t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in ref.tensors]
        assert mine.shapes == {t.name: tuple(int(d) for d in t.shape) for t in ref.tensors}
        assert mine.data_offset == ref.data_offset and mine.alignment == ref.alignment
        assert {n: mine.data_offset + o for n, o in mine.offsets.items()} == {t.name: int(t.data_offset) for t in ref.tensors}
    assert file_type_name(read_metadata(q).file_type) == "Q4_K_M"


def test_nominal_bits_from_type_names():
    assert [nominal_bits_of(t) for t in ("Q4_K_M", "Q8_0", "IQ4_NL", "Q2_K", "F16", "ALL_F32", "Q5_1", "TQ1_0")] == [4, 8, 4, 2, 16, 32, 5, 1]
