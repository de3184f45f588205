"""Which Java the native stack's Java programs run on (deploy/local/tools.java)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local import tools
from deploy.local.processes import StackError


def jdk(root: Path, name: str) -> str:
    java = root / name / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.touch()
    return str(root / name)


def test_an_explicit_setting_then_a_preferred_jdk_then_java_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preferred, home, explicit = jdk(tmp_path, "jdk-25"), jdk(tmp_path, "jdk-17"), jdk(tmp_path, "mine")
    monkeypatch.setattr(tools, "PREFERRED_JDKS", (str(tmp_path / "absent"), preferred))
    monkeypatch.setenv("JAVA_HOME", home)
    monkeypatch.setenv("PIPELINE_JAVA_HOME", explicit)
    assert tools.java() == f"{explicit}/bin/java"
    monkeypatch.delenv("PIPELINE_JAVA_HOME")
    assert tools.java() == f"{preferred}/bin/java"  # the cheaper TLS wins over a generic JAVA_HOME
    monkeypatch.setattr(tools, "PREFERRED_JDKS", (str(tmp_path / "absent"),))
    assert tools.java() == f"{home}/bin/java"


def test_a_setting_naming_no_java_stops_with_the_settings_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPELINE_JAVA_HOME", str(tmp_path / "nothing-here"))
    with pytest.raises(StackError, match="PIPELINE_JAVA_HOME or JAVA_HOME"):
        tools.java()
