"""Property-based: whatever bytes a manifest or CSV holds, the parsers either return records or
raise ManifestError naming the file; a manifest they wrote reads back unchanged."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_modules.data.manifest import ManifestError, Record, read_csv, read_manifest, write_manifest

cells = st.text(alphabet=string.printable.replace("\r", ""), max_size=12)
rows = st.lists(st.lists(cells, min_size=0, max_size=8), max_size=8)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(header=st.sampled_from(["image,label,patient_id,split,mask", "image,split", "label", "", "image,image"]),
       body=rows, raw=st.binary(max_size=64))
def test_any_manifest_parses_or_names_its_file(tmp_path, header, body, raw):
    path = tmp_path / "manifest.csv"
    text = header + "\n" + "\n".join(",".join(r) for r in body)
    for content in (text.encode(), raw):
        path.write_bytes(content)
        for parse in (read_manifest, lambda p: read_csv(p, required=("image",))):
            try:
                parse(path)
            except ManifestError as exc:
                assert str(path) in str(exc)


names = st.text(alphabet=string.ascii_letters + string.digits + "_-./ ", min_size=1, max_size=20).filter(
    lambda s: s.strip() == s and not s.startswith("/"))


@FUZZ
@given(records=st.lists(st.builds(Record, image=names, label=st.sampled_from(["", "normal", "pneumonia, viral"]),
                                  patient_id=names, split=st.sampled_from(["train", "val", "test"]),
                                  mask=st.sampled_from(["", "m.png"])), max_size=10))
def test_written_manifest_reads_back_unchanged(tmp_path, records):
    path = tmp_path / "manifest.csv"
    write_manifest(path, records)
    assert read_manifest(path) == records
