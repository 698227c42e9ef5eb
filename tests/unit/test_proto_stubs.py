"""The committed gRPC stubs are what `make proto` generates from the committed proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTO = "deploy/proto/moecluster_v1.proto"
STUBS = ("moecluster_v1_pb2.py", "moecluster_v1_pb2.pyi", "moecluster_v1_pb2_grpc.py")


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    (tmp_path / "deploy" / "proto").mkdir(parents=True)
    shutil.copy(REPO / PROTO, tmp_path / PROTO)
    args = ["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}"]
    args += [f"--grpc_python_out={tmp_path}", str(tmp_path / PROTO)]
    assert protoc.main(args) == 0, "protoc failed"
    for name in STUBS:
        fresh = (tmp_path / "deploy" / "proto" / name).read_text()
        committed = (REPO / "deploy" / "proto" / name).read_text()
        assert committed == fresh, f"deploy/proto/{name} is stale: run `make proto`"
