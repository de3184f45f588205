"""pipectl finds the repository's .stack/env when PIPELINE_* is not set, without running it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.cli import settings
from services.cli.main import main
from services.cli.settings import CliSettings, find_stack_env, load_settings, read_env_file, stack_env

ENV_FILE = """# written by `make up`; source it: . .stack/env
export PIPELINE_KAFKA_BOOTSTRAP='127.0.0.1:9'
export PIPELINE_IDENTITY_DIR='{identity_dir}'
export PIPELINE_PG_DSN='postgresql://u:p w@host/db'
export NOT_OURS='x'
echo this line is never run
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository with a .stack/env, no PIPELINE_* set, run from a directory inside it."""
    for name in list(os.environ):
        if name.startswith("PIPELINE_"):
            monkeypatch.delenv(name)
    (tmp_path / ".stack").mkdir()
    (tmp_path / ".stack" / "env").write_text(ENV_FILE.format(identity_dir=tmp_path / "ids"))
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "docs" / "deep")
    monkeypatch.setattr(settings, "PACKAGE_DIR", tmp_path / "docs")
    return tmp_path


def test_the_file_is_found_above_each_start_in_turn(tmp_path: Path) -> None:
    (tmp_path / "a" / ".stack").mkdir(parents=True)
    (tmp_path / "a" / ".stack" / "env").write_text("")
    (tmp_path / "b" / "c").mkdir(parents=True)
    assert find_stack_env([tmp_path / "b" / "c", tmp_path / "a" / "x"]) == tmp_path / "a" / ".stack" / "env"
    assert find_stack_env([tmp_path / "b" / "c"]) is None


def test_export_lines_are_parsed_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text(ENV_FILE.format(identity_dir="/ids") + "export BROKEN='unbalanced\nPLAIN=value # note\n")
    assert read_env_file(path) == {
        "PIPELINE_KAFKA_BOOTSTRAP": "127.0.0.1:9",
        "PIPELINE_IDENTITY_DIR": "/ids",
        "PIPELINE_PG_DSN": "postgresql://u:p w@host/db",
        "NOT_OURS": "x",
        "PLAIN": "value",
    }


def test_settings_come_from_the_file_and_say_so(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_settings(CliSettings)
    assert (loaded.kafka_bootstrap, loaded.identity_dir) == ("127.0.0.1:9", repo / "ids")
    assert str(repo / ".stack" / "env") in capsys.readouterr().err
    assert load_settings(CliSettings, identity="source-web").identity == "source-web"  # a flag wins


def test_the_file_is_found_from_pipectls_own_location(
    repo: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert stack_env()["kafka_bootstrap"] == "127.0.0.1:9"


def test_explicit_environment_wins_and_the_file_is_then_ignored(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIPELINE_IDENTITY_DIR", "/elsewhere")
    assert stack_env() == {}
    # Half of the file's settings are not mixed in: the missing one is named instead.
    assert main(["topics"]) == 2
    err = capsys.readouterr().err
    assert "PIPELINE_KAFKA_BOOTSTRAP" in err and "using" not in err


def test_pipectl_runs_on_the_files_settings(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The file's identity directory is empty: the command gets as far as loading the identity.
    assert main(["topics"]) == 1
    err = capsys.readouterr().err
    assert f"using {repo / '.stack' / 'env'}" in err and "operator-cli" in err


def test_no_file_no_settings(repo: Path) -> None:
    (repo / ".stack" / "env").unlink()
    assert stack_env({}) == {}
