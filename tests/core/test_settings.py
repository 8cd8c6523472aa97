"""Settings: every default in one class, overridable through GPURAG_ variables."""

from __future__ import annotations

import pytest

from gpurag import InvalidInputError, Settings, get_settings


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


def test_a_bad_environment_value_is_one_line_naming_the_variable_and_what_it_expects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPURAG_MEMORY_BUDGET_BYTES", "abc")
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidInputError) as caught:
            get_settings()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    message = str(caught.value)
    assert "\n" not in message
    assert "GPURAG_MEMORY_BUDGET_BYTES='abc'" in message
    assert "valid integer" in message


def test_max_k_defaults_to_65536() -> None:
    assert Settings().max_k == 65536
