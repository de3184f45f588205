"""pipectl's argument and settings checks: exit 2 with a message naming the problem, before any I/O."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.cli import settings as settings_module
from services.cli.main import main


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PIPELINE_* and no .stack/env to fall back on (a developer's checkout may have one)."""
    for name in list(os.environ):
        if name.startswith("PIPELINE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(settings_module, "PACKAGE_DIR", tmp_path)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Settings that pass validation but point at no broker and an empty identity dir."""
    monkeypatch.setenv("PIPELINE_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setenv("PIPELINE_IDENTITY_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "command"),
        (["produce", "--generate", "0"], "--generate"),
        (["produce", "--generate", "ten"], "--generate"),
        (["produce", "--generate", "5", "events.jsonl"], "not both"),
        (["produce", "--seed", "3", "events.jsonl"], "--seed"),
        (["produce", "--invalid-fraction", "0.1", "-"], "--invalid-fraction"),
        (["produce", "--generate", "5", "--invalid-fraction", "1.5"], "--invalid-fraction"),
        (
            ["produce", "--generate", "5", "--invalid-fraction", "0.7", "--duplicate-fraction", "0.7"],
            "add up",
        ),
        (["produce", "--rate", "0", "-"], "--rate"),
        (["produce", "--rate", "-5", "-"], "--rate"),
        (["produce", "--rate", "inf", "-"], "--rate"),  # librdkafka cannot pace or time out at infinity
        (["produce", "--timeout", "0", "-"], "--timeout"),
        (["produce", "-"], "--source NAME is required"),  # the operator must name the source
        (["produce", "--source", "Web", "-"], "--source 'Web'"),
        (["produce", "--identity", "source-web", "--source", "backend", "-"], "only pipeline.raw.web"),
        (["produce", "--generate", "5", "--source", "kiosk"], "kiosk"),
        (["dlq"], "dlq_command"),
        (["dlq", "show"], "ID"),
        (["dlq", "show", "12"], "entry id"),
        (["dlq", "show", "a:b"], "entry id"),
        (["dlq", "list", "--class", "nope"], "unknown --class nope"),
        (["dlq", "list", "--since", "last tuesday"], "--since"),
        (["dlq", "list", "--since", "2026-11-27", "--until", "2026-11-26"], "--since must be before"),
        (["dlq", "list", "--limit", "-1"], "--limit"),
        (["dlq", "replay"], "--class"),
        (["dlq", "replay", "0:1", "--class", "poison"], "not both"),
        (["dlq", "replay", "--stage", "ingester"], "--class"),
        (["dlq", "replay", "--class", "undecodable"], "undecodable"),
        (["dlq", "replay", "0:1", "x"], "entry id"),
        (["dlq", "replay", "0:1", "--timeout", "0"], "--timeout"),
    ],
)
def test_bad_usage_exits_2_naming_the_problem(
    settings: Path, argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert complaint in capsys.readouterr().err


def test_unreadable_file_exits_2_naming_it(settings: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["produce", "--source", "web", str(settings / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["topics"], ["produce", "--generate", "1"], ["dlq", "stats"]])
def test_missing_settings_exit_2_naming_them(
    no_settings: None, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "PIPELINE_KAFKA_BOOTSTRAP" in err and "PIPELINE_IDENTITY_DIR" in err


@pytest.mark.parametrize(
    "argv", [["produce", "--generate", "1"], ["dlq", "stats"], ["dlq", "show", "0:0"], ["topics"]]
)
def test_missing_identity_exits_1_naming_it(
    settings: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    assert "operator-cli" in capsys.readouterr().err


def test_identity_flag_is_the_identity_used(settings: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["produce", "--generate", "1", "--identity", "source-web"]) == 1
    assert "source-web" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["produce", "--help"]) == 0
    assert "--generate" in capsys.readouterr().out
