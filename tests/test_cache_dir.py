"""One cache folder for every cache (tokenised text, probe features): ``zoo.files.cache_dir``."""
from pathlib import Path

from zoo.files import cache_dir


def test_cache_dir_env_fallbacks(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOO_CACHE_DIR", raising=False)
    monkeypatch.delenv("ZOO_CACHE", raising=False)
    assert cache_dir("features") == Path.home() / ".cache" / "byol-zoo" / "features"
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "old"))  # the text cache's old variable still works
    assert cache_dir("text") == tmp_path / "old" / "text"
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "new"))  # and the one documented variable wins
    assert cache_dir("text") == tmp_path / "new" / "text"
    assert not (tmp_path / "new").exists()  # naming the folder creates nothing


def test_text_and_feature_caches_share_the_folder(monkeypatch, tmp_path):
    from zoo.data.text import TextDataModule
    from zoo.eval.features import default_cache_dir

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "features"
    assert TextDataModule().cache_root == tmp_path / "text"
    assert TextDataModule(cache_dir=str(tmp_path / "mine")).cache_root == tmp_path / "mine" / "text"
