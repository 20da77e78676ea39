"""deploy/k8s/components/persistent-registry: the LoadAdapter registry on a volume of its own.

The component is rendered the way a user adds it: an overlay (written under tmp_path) naming the CPU
overlay and the component by relative path.
"""

from __future__ import annotations

import os

import pytest
import yaml

from deploy_support import DEPLOY, run, tool

from loraplex_server.config import load_config

@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("overlay")
    k8s = os.path.relpath(DEPLOY / "k8s", root)
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{k8s}/overlays/cpu"], "components": [f"{k8s}/components/persistent-registry"]}))
    result = run(tool("kubectl"), "kustomize", str(root))
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_state_dir_is_a_writable_mount_of_its_own_claim(rendered):
    pod = _one(rendered, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    state_dir = env["LORAPLEX_STATE_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvcs = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "PersistentVolumeClaim"}
    assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Not on the shared adapters volume (ReadWriteMany: SQLite's WAL is not safe there).
    assert claim != "loraplex-adapters"
    # The server reads the variable as its state dir, over the image's settings file.
    settings = DEPLOY / "k8s" / "overlays" / "cpu" / "loraplex.toml"
    assert load_config(config_file=settings, environ={}).server.state_dir is None
    with_env = load_config(config_file=settings, environ={"LORAPLEX_STATE_DIR": state_dir})
    assert str(with_env.server.state_dir) == state_dir


def test_one_replica_replaced_not_surged(rendered):
    spec = _one(rendered, "Deployment")["spec"]
    assert spec["replicas"] == 1
    # A ReadWriteOnce claim cannot be attached to an old and a new pod at once.
    assert spec["strategy"] == {"type": "Recreate"}
    assert not [d for d in rendered if d["kind"] == "HorizontalPodAutoscaler"]


def test_rendered_component_validates_strictly(rendered, tmp_path):
    builtin = [d for d in rendered if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    result = run(tool("kubernetes-validate"), "--strict", str(path))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "WARN" not in output and "ERROR" not in output, output
    assert output.count("passed for resource") == len(builtin), output
