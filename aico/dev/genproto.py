"""Generate ``aico/proto`` from the ``.proto`` sources (``make proto``).

``--check`` regenerates into a temporary directory and fails when the committed
code differs, so ``make test`` catches a stale ``aico/proto``.
"""

from __future__ import annotations

import filecmp
import re
import sys
import tempfile
from pathlib import Path

_IMPORT = re.compile(r"^from aico\.(\S+) import ", re.M)


def generate(src: Path, out: Path) -> list[Path]:
    """Run grpcio-tools' protoc over every ``.proto`` under *src*, writing into *out*."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(src)) for p in src.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(p for p in out.rglob("*_pb2.py*") if p.suffix in (".py", ".pyi"))
    for path in written:
        # protoc writes absolute imports from the proto root; ours live under aico.proto.
        text = _IMPORT.sub(r"from aico.proto.aico.\1 import ", path.read_text())
        path.write_text(text)
    for d in {p.parent for p in written}:
        while d != out and d.is_relative_to(out):
            (d / "__init__.py").touch()
            d = d.parent
    return written


def main(argv: list[str]) -> int:
    check = "--check" in argv
    src, out = (Path(a) for a in argv if a != "--check")
    if not check:
        generate(src, out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(src, Path(tmp))
        fresh = sorted(p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file())
        stale = [
            str(rel)
            for rel in fresh
            if not (out / rel).exists() or not filecmp.cmp(Path(tmp) / rel, out / rel, shallow=False)
        ]
    if stale:
        print("aico/proto is stale, run `make proto`:", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
