"""Settings: every default in one class, overridable through GPURAG_ variables."""

from __future__ import annotations

import pytest

from gpurag import Settings, get_settings


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPURAG_MEMORY_BUDGET_BYTES", "1024")
    monkeypatch.setenv("GPURAG_BACKEND_PREFERENCE", '["numpy"]')
    settings = Settings()
    assert settings.memory_budget_bytes == 1024
    assert settings.backend_preference == ("numpy",)


def test_bad_values_are_rejected_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPURAG_MEMORY_BUDGET_BYTES", "-5")
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        Settings()


def test_get_settings_is_cached_until_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    assert get_settings() is first
    get_settings.cache_clear()
    try:
        assert get_settings() is not first
    finally:
        get_settings.cache_clear()
