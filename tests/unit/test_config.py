"""Bad configuration stops a component at start with a message naming the setting."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.config import StageSettings, describe_settings_error

GOOD = {
    "PIPELINE_KAFKA_BOOTSTRAP": "127.0.0.1:19092",
    "PIPELINE_IDENTITY_DIR": "/tmp/identities",
    "PIPELINE_IDENTITY": "service-ingester",
    "PIPELINE_OPA_URL": "https://127.0.0.1:18181",
    "PIPELINE_PG_DSN": "postgresql://pipeline:s3cret-pw@127.0.0.1:5432/pipeline",
}


def test_settings_come_from_pipeline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    settings = StageSettings()
    assert settings.kafka_bootstrap == "127.0.0.1:19092"
    assert str(settings.identity_dir) == "/tmp/identities"


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("PIPELINE_KAFKA_BOOTSTRAP", None, "kafka_bootstrap"),
        ("PIPELINE_OPA_URL", "127.0.0.1:18181", "opa_url"),
        ("PIPELINE_OPA_URL", "http://127.0.0.1:18181", "opa_url"),  # OPA answers mutual TLS only
        ("PIPELINE_IDENTITY", "", "identity"),
        ("PIPELINE_PG_DSN", "mysql://x", "pg_dsn"),
    ],
)
def test_missing_or_bad_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str | None, field: str
) -> None:
    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    if value is None:
        monkeypatch.delenv(variable)
    else:
        monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as error:
        StageSettings()
    assert field in str(error.value)


def test_secrets_are_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in GOOD.items():
        monkeypatch.setenv(k, v)
    settings = StageSettings()
    assert "s3cret-pw" not in repr(settings)
    assert settings.pg_dsn.get_secret_value() == GOOD["PIPELINE_PG_DSN"]
    monkeypatch.setenv("PIPELINE_PG_DSN", "mysql://pipeline:s3cret-pw@db/x")
    with pytest.raises(ValidationError) as error:
        StageSettings()
    described = describe_settings_error(error.value)
    assert "PIPELINE_PG_DSN: Value error, must be a postgresql:// URL" in described
    assert "s3cret-pw" not in described
