"""yamllint, with deploy/.yamllint, over every YAML file of ours under deploy/."""

from __future__ import annotations

from deploy_support import DEPLOY, OWN_DIRS, run, tool, yaml_files

CONFIG = DEPLOY / ".yamllint"


def test_yamllint_clean():
    files = yaml_files(*OWN_DIRS) + [CONFIG]
    assert len(files) >= 15, f"expected the deploy YAML files, found {files}"
    result = run(tool("yamllint"), "--strict", "--format", "parsable", "-c", str(CONFIG), *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_config_catches_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("enabled: yes\nitems:\n- a\n")
    result = run(tool("yamllint"), "--strict", "--format", "parsable", "-c", str(CONFIG), str(bad))
    assert result.returncode != 0 and "truthy" in result.stdout and "indentation" in result.stdout
