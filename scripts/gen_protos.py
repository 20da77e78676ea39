"""Generate the Python gRPC stubs from protos/ into client/loraplex/ (committed; a test checks freshness).

    python scripts/gen_protos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from grpc_tools import protoc
except ImportError:  # not a runtime dependency: the `protos` (or `test`) extra of loraplex-server
    sys.exit("gen_protos needs grpcio-tools: pip install grpcio-tools (or -e '.[protos]')")

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOS = ["loraplex/v1/loraplex.proto"]


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}",
                f"--pyi_out={out}", str(PROTO_ROOT / proto)]
        if protoc.main(args) != 0:
            sys.exit(f"protoc failed for {proto}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "client")
    generate(parser.parse_args().out)
