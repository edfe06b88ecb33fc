"""Regenerates the committed gRPC stubs (pagoda_pb2.py, pagoda_pb2.pyi, pagoda_pb2_grpc.py) from pagoda.proto.

    python -m pagoda.engine.entrypoints.grpc.generate_stubs           # rewrite the stubs
    python -m pagoda.engine.entrypoints.grpc.generate_stubs --check   # exit 1 if they are stale

Uses grpcio-tools (`pip install grpcio-tools`, a test dependency). The proto is compiled from a
temporary tree shaped like the installed package, so the generated code imports
`pagoda.engine.entrypoints.grpc.pagoda_pb2` rather than a top-level `pagoda_pb2`.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE_PATH = Path("pagoda/engine/entrypoints/grpc")
OUTPUTS = ("pagoda_pb2.py", "pagoda_pb2.pyi", "pagoda_pb2_grpc.py")
# The version of the generator that wrote a stub (not what it says about the proto): ignored by --check,
# so that a newer grpcio-tools, which stamps its own version, does not make unchanged stubs "stale".
GENERATOR_VERSION = re.compile(rb"(GRPC_GENERATED_VERSION = |# Protobuf Python Version: )\S+"
                               rb"|ValidateProtobufRuntimeVersion\([^)]*\)")


def _without_generator_version(stub: bytes) -> bytes:
    return GENERATOR_VERSION.sub(rb"\1", stub)


def generate(out_dir: Path) -> None:
    """Compiles pagoda.proto; writes the three stub files into out_dir."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / PACKAGE_PATH).mkdir(parents=True)
        shutil.copy(HERE / "pagoda.proto", root / PACKAGE_PATH / "pagoda.proto")
        status = protoc.main([
            "grpc_tools.protoc", f"-I{root}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}", str(PACKAGE_PATH / "pagoda.proto"),
        ])
        if status != 0:
            raise RuntimeError(f"protoc failed with status {status}")
        for name in OUTPUTS:
            shutil.copy(root / PACKAGE_PATH / name, out_dir / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the committed stubs")
    args = parser.parse_args(argv)
    if not args.check:
        generate(HERE)
        print(f"wrote {', '.join(OUTPUTS)} to {HERE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [name for name in OUTPUTS if _without_generator_version((Path(tmp) / name).read_bytes())
                 != _without_generator_version((HERE / name).read_bytes())]
    if stale:
        print(f"stale gRPC stubs: {stale}; run python -m pagoda.engine.entrypoints.grpc.generate_stubs")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
