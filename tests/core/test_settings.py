"""core/settings.py: the environment read once into one frozen object; the command line over it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from blackwheel.core.settings import ENV_VARS, PROJECT_ROOT, Settings, env_table


def test_defaults_without_any_variable():
    s = Settings.from_env({})
    assert (s.recipes, s.patches, s.wheelhouse, s.workdir) == (
        PROJECT_ROOT / "recipes", PROJECT_ROOT / "patches", PROJECT_ROOT / "wheelhouse", PROJECT_ROOT / "build")
    assert s.cache == Path.home() / ".cache" / "blackwheel"
    assert (s.mirror, s.offline, s.allow_absent, s.cache_url) == (None, False, False, None)


def test_the_environment_sets_every_field(tmp_path):
    env = {"BLACKWHEEL_RECIPES": str(tmp_path / "r"), "BLACKWHEEL_PATCHES": str(tmp_path / "p"),
           "BLACKWHEEL_CACHE": str(tmp_path / "c"), "BLACKWHEEL_WHEELHOUSE": str(tmp_path / "w"),
           "BLACKWHEEL_WORKDIR": str(tmp_path / "b"), "BLACKWHEEL_MIRROR": str(tmp_path / "m"),
           "BLACKWHEEL_OFFLINE": "1", "BLACKWHEEL_ALLOW_ABSENT": "1", "BLACKWHEEL_CACHE_URL": "off"}
    s = Settings.from_env(env)
    assert (s.recipes, s.patches, s.cache, s.wheelhouse, s.workdir, s.mirror) == tuple(
        tmp_path / n for n in ("r", "p", "c", "w", "b", "m"))
    assert (s.offline, s.allow_absent, s.cache_url) == (True, True, "off")
    assert Settings.from_env({"BLACKWHEEL_OFFLINE": "0"}).offline is False


def test_options_override_and_unset_options_keep(tmp_path):
    s = Settings.from_env({"BLACKWHEEL_OFFLINE": "1", "BLACKWHEEL_MIRROR": "/m"})
    same = s.with_options(offline=None, mirror=None, allow_absent=None, wheelhouse=None)
    assert same == s
    other = s.with_options(mirror=str(tmp_path), wheelhouse=str(tmp_path / "w"), allow_absent=True)
    assert (other.mirror, other.wheelhouse, other.allow_absent, other.offline) == (
        tmp_path, tmp_path / "w", True, True)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings.from_env({}).offline = True


def test_the_table_names_each_variable_once():
    names = [v.name for v in ENV_VARS]
    assert len(names) == len(set(names)) and all(n.startswith("BLACKWHEEL_") for n in names)
    assert env_table().count("\n") == len(names) + 1
