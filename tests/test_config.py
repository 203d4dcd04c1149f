"""The typed configuration: profiles, config files, --set overrides, validation and docs."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.cli import PROFILES as CLI_PROFILES
from pipeline.config import (
    PROFILES,
    ConfigError,
    PipelineConfig,
    build_config,
    config_hash,
    describe,
    from_dict,
    parse_override,
    to_dict,
)


def test_defaults_and_profiles_are_valid() -> None:
    assert CLI_PROFILES == PROFILES
    for profile in PROFILES:
        config = build_config(profile)
        assert isinstance(config, PipelineConfig)
    assert build_config("demo").output.num_shards == 1
    assert build_config("dataflow").read.validate_max_files == 200


def test_layers_profile_then_file_then_set(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("group:\n  min_images: 5\n  max_images_per_page: 12\nnormalize:\n  quality: 80\n")
    config = build_config("demo", str(path), ["group.min_images=4", "normalize.tracking_params=[utm_*, ref]",
                                              "dedupe.near_duplicate_max_distance=3.0",
                                              "normalize.max_aspect_ratio=3"])
    assert config.group.min_images == 4                # --set wins over the file
    assert config.group.max_images_per_page == 12      # the file wins over the profile
    assert config.normalize.quality == 80
    assert config.normalize.tracking_params == ("utm_*", "ref")
    assert config.dedupe.near_duplicate_max_distance == 3 and isinstance(config.dedupe.near_duplicate_max_distance, int)
    assert config.normalize.max_aspect_ratio == 3.0 and isinstance(config.normalize.max_aspect_ratio, float)
    assert config.output.num_shards == 1               # untouched profile value
    comma = build_config("demo", None, ["normalize.tracking_params=utm_*,fbclid"])
    assert comma.normalize.tracking_params == ("utm_*", "fbclid")


@pytest.mark.parametrize("override, message", [
    ("group.min_imags=3", "unknown config key 'group.min_imags' (did you mean 'group.min_images'?)"),
    ("grup.min_images=3", "unknown config key 'grup' (did you mean 'group'?)"),
    ("group.min_images=three", "group.min_images: expected an integer, got 'three'"),
    ("group.min_images=2.5", "group.min_images: expected an integer, got 2.5"),
    ("read.reshuffle=maybe", "read.reshuffle: expected true or false, got 'maybe'"),
    ("normalize.max_aspect_ratio=[1]", "normalize.max_aspect_ratio: expected a number"),
    ("normalize.quality=0", "normalize: quality must be within 1..100, got 0"),
    ("group.max_images_per_page=2", "group: max_images_per_page (2) must be >= min_images (3)"),
    ("group", "expected section.key=value"),
    ("group=3", "the key must be section.key"),
    ("group.min_images.x=3", "group.min_images: expected an integer"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config("demo", None, [override])
    assert message in str(caught.value)


def test_bad_profile_and_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown profile 'prod'"):
        build_config("prod")
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config("demo", str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("group: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        build_config("demo", str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        build_config("demo", str(scalar))


def test_override_values_parse_as_yaml() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a.b=gs://bucket/x=y") == (["a", "b"], "gs://bucket/x=y")
    assert parse_override("a.b=") == (["a", "b"], "")


def test_round_trip_and_hash() -> None:
    config = build_config("local", None, ["group.min_images=4"])
    assert from_dict(PipelineConfig, to_dict(config)) == config
    assert config_hash(config) == config_hash(from_dict(PipelineConfig, to_dict(config)))
    assert config_hash(config) != config_hash(build_config("local"))


def test_every_key_is_documented() -> None:
    docs = describe()
    keys = [d.key for d in docs]
    assert len(keys) == len(set(keys))
    assert "normalize.min_side" in keys and "dedupe.boilerplate_max_pages" in keys
    for doc in docs:
        assert doc.help.strip(), doc.key
    by_key = {d.key: d for d in docs}
    assert by_key["normalize.min_side"].default == 256
    assert by_key["group.min_images"].type == "int"


def test_configs_are_frozen() -> None:
    config = build_config("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.group.min_images = 1  # type: ignore[misc]
