"""The one typed configuration object of a run, and how it is built.

``PipelineConfig`` has one section per stage; each section is a frozen dataclass of
:mod:`transforms.settings` (``card`` and ``report``, the launcher's own, are here), which validates itself in
``__post_init__``; none of them imports a stage, so reading a configuration is quick. A run's configuration is
built in three layers, later ones winning:

1. the profile (``pipeline/profiles/<name>.yaml``: ``demo``, ``local`` or ``dataflow``),
2. an optional YAML file (``--config FILE.yaml``, any Beam file system path),
3. ``--set section.key=value`` overrides, each value parsed as YAML (``--set group.min_images=4``,
   ``--set normalize.tracking_params=[utm_*,ref]``).

Unknown sections and keys, values of the wrong type and values a section refuses all raise
:class:`ConfigError` with the dotted key and what was expected, before any pipeline is built.
``icl-pipeline config --list`` prints every key with its default and help.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import yaml

from transforms.settings import (
    AssembleConfig,
    CaptionConfig,
    ClusterFilterConfig,
    CrossPageConfig,
    DecontaminateConfig,
    DedupeConfig,
    DetectorConfig,
    EmbedConfig,
    ExtractConfig,
    FetchConfig,
    GroupConfig,
    LLMConfig,
    NormalizeConfig,
    NsfwConfig,
    OutputConfig,
    PeopleConfig,
    PromptsConfig,
    ReadConfig,
    ScoreConfig,
    SemanticDedupConfig,
    SubjectConfig,
    SynthConfig,
    TargetFilterConfig,
    option,
)

PROFILES = ("demo", "local", "dataflow")
"""The configuration profiles (``pipeline/profiles/<name>.yaml``)."""


# --- the launcher's own sections (the stages' are in transforms/settings.py) --------------------------------


@dataclass(frozen=True)
class CardConfig:
    """The dataset card (config section ``card``)."""

    enabled: bool = option(True, "Write the dataset card OUT/README.md at the end of phase assemble.")
    title: str = option("ICL examples for subject-driven text-to-image", "Title of the dataset card.")
    license: str = option("unknown", "Licence of the input images and texts, as a Hugging Face licence id "
                                     "(cc-by-4.0, other, ...); 'unknown' unless you know it.")
    license_note: str = option("", "Free text about the inputs' licences and attribution, printed in the card.")

    def __post_init__(self) -> None:
        if not self.license.strip():
            raise ValueError("license must not be empty (use 'unknown')")


@dataclass(frozen=True)
class ReportConfig:
    """The visual report (config section ``report``)."""

    enabled: bool = option(True, "Write OUT/report/index.html at the end of a run that includes phase assemble "
                                 "(icl-pipeline report OUT writes it for any run).")
    examples: int = option(48, "Kept examples shown in the gallery (a deterministic sample).")
    rejects_per_reason: int = option(6, "Rejected candidates shown per reject reason.")
    clusters: int = option(12, "Clusters shown in the cluster gallery.")
    thumbnail_px: int = option(160, "Longest side of the thumbnails, in pixels.")
    read_budget_mb: int = option(256, "Megabytes of Parquet row groups (at least one) read per gallery: bounds the "
                                      "time to write the report whatever the size of the run.")
    bins: int = option(30, "Bins per histogram.")

    def __post_init__(self) -> None:
        for name in ("examples", "rejects_per_reason", "clusters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.thumbnail_px < 16:
            raise ValueError(f"thumbnail_px must be at least 16, got {self.thumbnail_px}")
        if self.read_budget_mb < 1 or self.bins < 2:
            raise ValueError("read_budget_mb must be at least 1 and bins at least 2")


@dataclass(frozen=True)
class WorkersConfig:
    """Worker processes of a run on the local DirectRunner (config section ``workers``); Beam's
    ``--direct_running_mode`` and ``--direct_num_workers`` override it."""

    processes: int = option(0, "Worker processes of a local phase that runs in several (the multi-process "
                               "DirectRunner: the Fn API path of Flink and Dataflow); 0: one per core.")
    min_records: int = option(2000, "A local run of phase clusters (its input records) or assemble (its candidates) "
                                    "runs in worker processes when it has at least this many, else in the "
                                    "launching process: each worker starts Python and loads the models, which costs "
                                    "more than it gives on a small input (benchmarks/results/workers.json). 0: "
                                    "always. Phase synthesize runs in one process (its model uses every core, or the "
                                    "GPU) unless --direct_num_workers says otherwise.")

    def __post_init__(self) -> None:
        if self.processes < 0 or self.min_records < 0:
            raise ValueError(f"processes and min_records must be >= 0, got {self.processes} and {self.min_records}")


# --- the whole configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of a run, one section per stage."""

    read: ReadConfig = field(default_factory=ReadConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    people: PeopleConfig = field(default_factory=PeopleConfig)
    nsfw: NsfwConfig = field(default_factory=NsfwConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster_filter: ClusterFilterConfig = field(default_factory=ClusterFilterConfig)
    cross_page: CrossPageConfig = field(default_factory=CrossPageConfig)
    semantic_dedup: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    subject: SubjectConfig = field(default_factory=SubjectConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    target_filter: TargetFilterConfig = field(default_factory=TargetFilterConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    card: CardConfig = field(default_factory=CardConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)

    def __post_init__(self) -> None:
        if self.cluster_filter.enabled and not self.embed.enabled:
            raise ConfigError("cluster_filter.enabled needs embeddings, but embed.enabled is false; also set "
                              "cluster_filter.enabled=false (--set cluster_filter.enabled=false) or enable embed")
        if self.semantic_dedup.enabled and not self.embed.enabled:
            raise ConfigError("semantic_dedup.enabled needs embeddings, but embed.enabled is false; also set "
                              "semantic_dedup.enabled=false (--set semantic_dedup.enabled=false) or enable embed")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what is wrong."""


# --- building ---------------------------------------------------------------------------------------


def load_profile(name: str) -> dict[str, Any]:
    """The settings a profile changes from the defaults."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    text = resources.files("pipeline").joinpath("profiles", f"{name}.yaml").read_text(encoding="utf-8")
    return _yaml_mapping(text, f"profile {name}")


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML config file, local or on any Beam file system (``gs://``, ``s3://``)."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as handle:
            text = handle.read().decode("utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from error
    return _yaml_mapping(text, path)


def _yaml_mapping(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: invalid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"section.key=value"`` -> (``["section", "key"]``, value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {text!r}: the key must be section.key (for example group.min_images)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(profile: str = "demo", config_file: str | None = None,
                 overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Profile -> config file -> ``--set`` overrides -> a validated :class:`PipelineConfig`."""
    data = load_profile(profile)
    if config_file:
        data = _merge(data, load_config_file(config_file))
    for override in overrides:
        path, value = parse_override(override)
        update: dict[str, Any] = value
        for part in reversed(path):
            update = {part: update}
        data = _merge(data, update)
    return from_dict(PipelineConfig, data)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build the dataclass ``cls`` from nested plain data, checking keys and types."""
    label = where or "config"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {_join(where, close[0])!r}?)" if close else ""
        raise ConfigError(f"unknown config key {_join(where, str(key))!r}{hint}; "
                          f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(value, hints[name], _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{label}: {error}") from error


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; learning rates look like that
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


# --- describing ---------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested data (tuples as lists), as written to the manifest and printed by ``config``."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(config)


def config_hash(config: Any) -> str:
    """SHA-256 of the canonical JSON of a config (or config section): the provenance of a dataset."""
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: Any
    help: str


def describe(cls: type = PipelineConfig, where: str = "") -> list[KeyDoc]:
    """Every leaf key of a config class with its type, default and help text."""
    docs = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = _join(where, f.name)
        if dataclasses.is_dataclass(tp):
            docs.extend(describe(tp, key))
        else:
            docs.append(KeyDoc(key, _type_name(tp), to_dict(getattr(default, f.name)), f.metadata.get("help", "")))
    return docs
