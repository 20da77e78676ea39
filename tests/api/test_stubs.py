"""The committed gRPC stubs are exactly what protos/ generates today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_the_stubs_changes_nothing(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*") if p.is_file())
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = ROOT / "client" / rel
        assert committed.is_file(), f"{rel} is generated but not committed"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run scripts/gen_protos.py"


def test_the_public_contract_names():
    from loraplex.v1 import loraplex_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["LoraplexService"]
    assert pb.DESCRIPTOR.package == "loraplex.v1"
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "LoadAdapter", "UnloadAdapter",
                                                 "ListAdapters", "GetServerInfo"}
    assert service.methods_by_name["GenerateStream"].server_streaming
    req = pb.GenerateRequest.DESCRIPTOR
    assert [f.name for f in req.oneofs_by_name["input"].fields] == ["prompt", "messages", "prompt_token_ids"]
    assert pb.SamplingParams.DESCRIPTOR.fields_by_name["seed"].has_presence
    assert {"FINISH_REASON_LENGTH", "FINISH_REASON_STOP", "FINISH_REASON_EOS"} <= set(pb.FinishReason.keys())
