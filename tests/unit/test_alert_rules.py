"""The Prometheus alert rules (deploy/prometheus/rules/) are valid, and behave as their
promtool unit tests (deploy/prometheus/rules/tests/) say: every alert fires where it must
and stays quiet where it must not. Runs the local promtool binary, no services."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.prometheus import promtool as prom
from tests.unit.promtool_runner import output, promtool

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"
RULE_FILES = sorted(RULES.glob("*.yml"))
TEST_FILES = sorted((RULES / "tests").glob("*.yml"))


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _alerts() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for path in RULE_FILES
        for group in _load(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _cases() -> list[tuple[str, list[Any]]]:
    """(alert name, expected alerts) of every alert_rule_test case."""
    return [
        (case["alertname"], case.get("exp_alerts") or [])
        for path in TEST_FILES
        for test in _load(path)["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_the_files_are_there() -> None:
    assert RULE_FILES, f"no rule files in {RULES}"
    assert TEST_FILES, f"no promtool tests in {RULES / 'tests'}"


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", *RULE_FILES)
    assert result.returncode == 0, output(result)


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", *TEST_FILES)
    assert result.returncode == 0, output(result)


def test_every_test_file_loads_the_rule_files() -> None:
    # A test file that loads no rules passes vacuously.
    for path in TEST_FILES:
        loaded = {(path.parent / name).resolve() for name in _load(path)["rule_files"]}
        assert loaded == set(RULE_FILES), f"{path.name} loads {sorted(loaded)}"


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = _cases()
    for name in _alerts():
        expected = [alerts for alertname, alerts in cases if alertname == name]
        assert any(expected), f"{name}: no promtool case where it fires"
        assert not all(expected), f"{name}: no promtool case where it must not fire (exp_alerts: [])"


def test_every_tested_alert_exists() -> None:
    unknown = {name for name, _ in _cases()} - set(_alerts())
    assert not unknown, f"promtool cases for alerts no rule file defines: {sorted(unknown)}"


def test_every_alert_has_severity_and_annotations() -> None:
    for name, rule in _alerts().items():
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{name}: no {key} annotation"
        assert "pipectl" in annotations["runbook"] or "README" in annotations["runbook"], name


def test_runbooks_name_readme_sections_that_exist() -> None:
    # `README "Section"` in a runbook must stay a heading of the README.
    readme = (RULES.parents[2] / "README.md").read_text(encoding="utf-8")
    headings = {line.lstrip("#").strip() for line in readme.splitlines() if line.startswith("#")}
    for name, rule in _alerts().items():
        runbook = rule["annotations"]["runbook"]
        if "README" in runbook:
            sections = re.findall(r'"([^"]+)"', runbook.split("README", 1)[1])
            assert sections, f"{name}: README named without a section"
            assert set(sections) <= headings, f"{name}: not README headings: {set(sections) - headings}"


# --- finding promtool ----------------------------------------------------------------


def _fake_promtool(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_promtool_prefers_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _fake_promtool(tmp_path / "mine" / "promtool")
    _fake_promtool(tmp_path / "cache" / "prometheus" / "usr" / "bin" / "promtool")
    monkeypatch.setenv("PIPELINE_PROMTOOL", str(explicit))
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    assert prom.find_promtool() == explicit


def test_find_promtool_a_wrong_variable_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_promtool(tmp_path / "cache" / "prometheus" / "usr" / "bin" / "promtool")
    monkeypatch.setenv("PIPELINE_PROMTOOL", str(tmp_path / "missing"))
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(prom.PromtoolNotFound, match="PIPELINE_PROMTOOL"):
        prom.find_promtool()


def test_find_promtool_then_the_cache_then_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_PROMTOOL", raising=False)
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    on_path = _fake_promtool(tmp_path / "bin" / "promtool")
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert prom.find_promtool() == on_path
    cached = _fake_promtool(tmp_path / "cache" / "prometheus" / "usr" / "bin" / "promtool")
    assert prom.find_promtool() == cached


def test_find_promtool_missing_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_PROMTOOL", raising=False)
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", os.fspath(tmp_path / "empty"))
    with pytest.raises(prom.PromtoolNotFound, match="make deps"):
        prom.find_promtool()
