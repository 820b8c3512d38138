"""Regenerates the Python stubs (with .pyi) from the .proto files here: `python -m lstm_onnx.protos.generate`."""
from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("model_config.proto", "grpc_service.proto")


def generate_stubs(out_dir: Path = HERE) -> list[Path]:
    """Run grpc_tools.protoc on PROTOS into out_dir and make the imports relative (package lstm_onnx.protos)."""
    from grpc_tools import protoc  # only needed to regenerate, so not a runtime dependency

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}", *[str(HERE / p) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(PROTOS)}")
    for stale in out_dir.glob("model_config_pb2_grpc.py"):  # a service-less file: nothing to keep
        stale.unlink()
    written = sorted(p for p in out_dir.glob("*_pb2*.py*"))
    modules = "|".join(p.removesuffix(".proto") + "_pb2(?:_grpc)?" for p in PROTOS)
    # protoc writes `import model_config_pb2`, which only works with protos/ on sys.path; the package
    # needs `from . import model_config_pb2`.
    pattern = re.compile(rf"^import ({modules}) as (\w+)$", re.M)
    for path in written:
        text = path.read_text()
        fixed = pattern.sub(r"from . import \1 as \2", text)
        fixed = re.sub(rf"^import ({modules})$", r"from . import \1", fixed, flags=re.M)
        # Register in the package's own pool: tritonclient puts the same names in the default one.
        fixed = fixed.replace("_descriptor_pool.Default()", "_POOL")
        if "_POOL" in fixed and "from . import POOL as _POOL" not in fixed:
            fixed = fixed.replace("from google.protobuf import descriptor_pool as _descriptor_pool\n",
                                  "from google.protobuf import descriptor_pool as _descriptor_pool\n"
                                  "from . import POOL as _POOL\n", 1)
        if fixed != text:
            path.write_text(fixed)
    return written


def main() -> int:
    for path in generate_stubs():
        print(path.relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
