"""Server settings: DINO_* environment variables and choosing the model to serve."""

from __future__ import annotations

import shutil

import pytest
from service_helpers import serve, settings_for

from service.settings import Settings, SettingsError, attention_max_side, find_model_dir


def test_environment_variables_with_the_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("DINO_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("DINO_MAX_BATCH", "4")
    monkeypatch.setenv("DINO_API_TOKEN", "t")
    monkeypatch.setenv("DINO_INDEX_TYPE", "hnsw")
    monkeypatch.setenv("DINO_MODEL_VARIANT", "int8")
    s = Settings()
    assert (s.models_dir, s.max_batch, s.api_token) == (tmp_path, 4, "t")
    assert (s.index_type, s.model_variant) == ("hnsw", "int8")
    assert s.host == "127.0.0.1" and s.port == 8000 and s.threads >= 1
    monkeypatch.setenv("DINO_INDEX_TYPE", "annoy")
    with pytest.raises(ValueError, match="index_type"):
        Settings()


def test_the_only_model_is_chosen_and_several_need_a_name(tiny_vit_dir, tmp_path):
    store = tmp_path / "models"
    shutil.copytree(tiny_vit_dir, store / "one")
    assert find_model_dir(Settings(models_dir=store)) == store / "one"
    shutil.copytree(tiny_vit_dir, store / "two")
    with pytest.raises(SettingsError, match=r"several models .*\(one, two\).*DINO_MODEL"):
        find_model_dir(Settings(models_dir=store))
    assert find_model_dir(Settings(models_dir=store, model="two")) == store / "two"
    with pytest.raises(SettingsError, match="DINO_MODEL='three'"):
        find_model_dir(Settings(models_dir=store, model="three"))
    with pytest.raises(SettingsError, match="does not exist"):
        find_model_dir(Settings(models_dir=tmp_path / "nowhere"))
    with pytest.raises(SettingsError, match="no model in"):
        find_model_dir(Settings(models_dir=tmp_path / "models" / "one"))


def test_attention_side_scales_with_the_patch_size():
    s = Settings(attention_max_side=448)
    assert attention_max_side(s, 16) == 448
    assert attention_max_side(s, 8) == 224
    assert attention_max_side(s, 14) == 392


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_index_parameters_come_from_the_environment(monkeypatch, tiny_vit_dir, tmp_path):
    monkeypatch.setenv("DINO_INDEX_PARAMS", '{"ef_search": 200, "hnsw_m": 16}')
    settings = settings_for(tiny_vit_dir, tmp_path / "data", index_type="hnsw")
    async with serve(settings) as client:
        stats = (await client.get("/index")).json()
    assert stats["type"] == "hnsw"
    assert stats["params"] == {"hnsw_m": 16, "ef_construction": 80, "ef_search": 200}
    monkeypatch.setenv("DINO_INDEX_PARAMS", "not json")
    with pytest.raises(ValueError, match="index_params"):
        Settings()


def test_host_and_origin_lists_and_decoding_budgets_from_the_environment(monkeypatch):
    monkeypatch.setenv("DINO_ALLOWED_HOSTS", "api.example, *.lan")
    monkeypatch.setenv("DINO_ALLOWED_ORIGINS", '["https://app.example"]')
    s = Settings()
    assert s.host_names() == ("api.example", "*.lan")
    assert s.allowed_origins == ["https://app.example"]
    monkeypatch.setenv("DINO_ALLOWED_HOSTS", "")
    assert Settings().host_names() == ("127.0.0.1", "localhost", "::1")
    monkeypatch.setenv("DINO_MAX_DECODE_PIXELS", "1000")
    with pytest.raises(ValueError, match="DINO_MAX_DECODE_PIXELS .* DINO_MAX_IMAGE_PIXELS"):
        Settings()
