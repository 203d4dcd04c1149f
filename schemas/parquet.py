"""Parquet layouts of the pipeline's outputs, shared by the writers, the readers and the tests.

Each output has exactly one ``pa.schema``; its metadata names the output and the schema version, and
:func:`check_schema_version` is what readers call before trusting a file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from schemas.records import (
    Candidate,
    Cluster,
    ClusterProvenance,
    ClusterStats,
    Example,
    ImageRecord,
    Prompt,
    Reject,
    SampleSettings,
    ScoredCandidate,
    SynthSeconds,
    TargetScores,
    TrainSettings,
)

SCHEMA_VERSION = 2
"""Version of every layout in this module. Bump it when a field changes meaning or type (2: image columns are
Hugging Face ``Image`` structs, ``{bytes, path}``, and every file carries its ``datasets`` features)."""

_VERSION_KEY = b"icl.schema_version"
_NAME_KEY = b"icl.schema"
_HF_KEY = b"huggingface"

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""An image column: the layout Hugging Face ``datasets`` stores its ``Image`` feature in, so that
``load_dataset("parquet", ...)`` returns PIL images and the Hub viewer previews them. ``bytes`` holds the encoded
image (JPEG or PNG); ``path`` is empty (the bytes are the image)."""


def image_cell(data: bytes) -> dict[str, Any]:
    """An image column's value for encoded image bytes."""
    return {"bytes": data, "path": None}


def image_bytes(value: Any) -> bytes | None:
    """The encoded bytes of an image column's value (also of a version-1 file's plain binary column)."""
    if isinstance(value, dict):
        return value.get("bytes")
    return value


_HF_VALUE_TYPES = {
    pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary", pa.bool_(): "bool",
    pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
    pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64",
}


def hf_feature(arrow_type: pa.DataType) -> Any:
    """The Hugging Face ``datasets`` feature (as its ``to_dict`` form) of an Arrow type; :data:`IMAGE_TYPE` is an
    ``Image``."""
    if arrow_type == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_struct(arrow_type):
        return {arrow_type.field(i).name: hf_feature(arrow_type.field(i).type) for i in range(arrow_type.num_fields)}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return {"feature": hf_feature(arrow_type.value_type), "_type": "List"}
    return {"dtype": _HF_VALUE_TYPES[arrow_type], "_type": "Value"}


def _has_image(arrow_type: pa.DataType) -> bool:
    if arrow_type == IMAGE_TYPE:
        return True
    if pa.types.is_struct(arrow_type):
        return any(_has_image(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _has_image(arrow_type.value_type)
    return False


def _nullable(field: pa.Field) -> pa.Field:
    """The field with every level nullable (its children too)."""
    t = field.type
    if pa.types.is_struct(t):
        t = pa.struct([_nullable(t.field(i)) for i in range(t.num_fields)])
    elif pa.types.is_list(t):
        t = pa.list_(_nullable(t.value_field))
    elif pa.types.is_large_list(t):
        t = pa.large_list(_nullable(t.value_field))
    return pa.field(field.name, t, nullable=True, metadata=field.metadata)


def _with_metadata(name: str, fields: list[pa.Field]) -> pa.Schema:
    # ``datasets`` takes a column's feature from the metadata only when the feature's own Arrow field equals the
    # file's, and its fields are all nullable: a column that holds an image is stored with every level nullable,
    # or ``load_dataset`` would give its images as raw {bytes, path} dicts. Their values are still always set: the
    # rows come from typed records (``*_to_row``).
    fields = [_nullable(f) if _has_image(f.type) else f for f in fields]
    features = {f.name: hf_feature(f.type) for f in fields}
    return pa.schema(fields, metadata={_NAME_KEY: name.encode(), _VERSION_KEY: str(SCHEMA_VERSION).encode(),
                                       _HF_KEY: json.dumps({"info": {"features": features}}).encode()})


CLUSTER_IMAGE_TYPE = pa.struct([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("record_id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("image_url", pa.string()),
    pa.field("image", IMAGE_TYPE, nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("source_width", pa.int32()),
    pa.field("source_height", pa.int32()),
    pa.field("source_format", pa.string()),
    pa.field("text", pa.string()),
    pa.field("text_truncated", pa.bool_()),
    pa.field("caption", pa.string()),
    pa.field("phash", pa.string()),
    pa.field("embedding", pa.list_(pa.float16())),
    pa.field("coherence", pa.float32()),
    pa.field("face_count", pa.int32()),
    pa.field("face_share", pa.float32()),
    pa.field("faces_blurred", pa.int32()),
    pa.field("nsfw_score", pa.float32()),
])

CLUSTER_STATS_TYPE = pa.struct([
    pa.field("n_images", pa.int32(), nullable=False),
    pa.field("n_page_images", pa.int32()),
    pa.field("mean_sim", pa.float32()),
    pa.field("min_sim", pa.float32()),
])

PROMPT_TYPE = pa.struct([pa.field("prompt", pa.string()), pa.field("skill", pa.string())])

CLUSTER_PROVENANCE_TYPE = pa.struct([
    pa.field("caption_backend", pa.string()),
    pa.field("subject_backend", pa.string()),
    pa.field("prompts_backend", pa.string()),
    pa.field("fallbacks", pa.list_(pa.string())),
    pa.field("caption_model", pa.string()),
    pa.field("caption_prompt", pa.string()),
    pa.field("subject_model", pa.string()),
    pa.field("subject_prompt", pa.string()),
    pa.field("prompts_model", pa.string()),
    pa.field("prompts_prompt", pa.string()),
    pa.field("embed_model", pa.string()),
])

# Model ids and prompt hashes of the model stages (plain strings, written and read by name).
_PROVENANCE_NAMES = ("caption_model", "caption_prompt", "subject_model", "subject_prompt", "prompts_model",
                     "prompts_prompt", "embed_model")

CLUSTERS_SCHEMA = _with_metadata("clusters", [
    pa.field("cluster_id", pa.string(), nullable=False),
    pa.field("page_url", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("subject", pa.string()),
    pa.field("class_noun", pa.string()),
    pa.field("is_live", pa.bool_()),
    pa.field("images", pa.list_(CLUSTER_IMAGE_TYPE), nullable=False),
    pa.field("stats", CLUSTER_STATS_TYPE, nullable=False),
    pa.field("prompts", pa.list_(PROMPT_TYPE)),
    pa.field("provenance", CLUSTER_PROVENANCE_TYPE),
])

REJECTS_SCHEMA = _with_metadata("rejects", [
    pa.field("id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
    pa.field("page_url", pa.string()),
    pa.field("image_url", pa.string()),
    pa.field("n_images", pa.int32(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("cluster_id", pa.string()),
    pa.field("image_ids", pa.list_(pa.string())),
    pa.field("record_ids", pa.list_(pa.string())),
])


# --- examples/*.parquet: one row per training example (3 real demos + 1 synthetic target) -----------

DEMO_TYPE = pa.struct([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image", IMAGE_TYPE, nullable=False),
    pa.field("caption", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
])

TARGET_TYPE = pa.struct([
    pa.field("candidate_id", pa.string(), nullable=False),
    pa.field("image", IMAGE_TYPE, nullable=False),
    # The trainer's prompt: the template with the subject phrase, no identifier ("a red teapot on a beach").
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("prompt_template", pa.string()),
    # What the DreamBooth rendered, with its identifier token ("a sks teapot on a beach").
    pa.field("rendered_prompt", pa.string()),
    pa.field("skill", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("k", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    # The real image the target is nearest to (see schemas.records.ScoredCandidate); never a demo.
    pa.field("source_image_id", pa.string()),
])

SCORES_TYPE = pa.struct([
    pa.field("subject_sim", pa.float32()),
    pa.field("subject_sim_max", pa.float32()),
    pa.field("text_sim", pa.float32()),
    pa.field("copy_distance", pa.int32()),
    pa.field("brightness", pa.float32()),
    pa.field("contrast", pa.float32()),
    pa.field("sharpness", pa.float32()),
    pa.field("nsfw_score", pa.float32()),
])

EXAMPLE_PROVENANCE_TYPE = pa.struct([
    pa.field("pipeline_version", pa.string()),
    pa.field("config_hash", pa.string()),
    pa.field("clip_model", pa.string()),
    pa.field("synth_model", pa.string()),
    pa.field("synth_config_hash", pa.string()),
    pa.field("caption_backend", pa.string()),
    pa.field("caption_model", pa.string()),
    pa.field("caption_prompt", pa.string()),
    pa.field("subject_backend", pa.string()),
    pa.field("subject_model", pa.string()),
    pa.field("subject_prompt", pa.string()),
    pa.field("prompts_backend", pa.string()),
    pa.field("prompts_model", pa.string()),
    pa.field("prompts_prompt", pa.string()),
    pa.field("fallbacks", pa.list_(pa.string())),
])

EXAMPLES_SCHEMA = _with_metadata("examples", [
    pa.field("example_id", pa.string(), nullable=False),
    pa.field("cluster_id", pa.string(), nullable=False),
    pa.field("page_url", pa.string()),
    pa.field("subject", pa.string()),
    pa.field("class_noun", pa.string()),
    pa.field("demos", pa.list_(DEMO_TYPE), nullable=False),
    pa.field("target", TARGET_TYPE, nullable=False),
    pa.field("scores", SCORES_TYPE),
    pa.field("provenance", EXAMPLE_PROVENANCE_TYPE),
])

# --- scores/*.parquet: one row per scored candidate and the filter's decision (no images) --------------

TARGET_SCORES_SCHEMA = _with_metadata("target_scores", [
    pa.field("candidate_id", pa.string(), nullable=False),
    pa.field("cluster_id", pa.string(), nullable=False),
    pa.field("skill", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("source_image_id", pa.string()),
    pa.field("scores", SCORES_TYPE, nullable=False),
    # "kept", or the reject reason: the first failed criterion in the filter's order.
    pa.field("decision", pa.string(), nullable=False),
    # Every criterion the candidate fails, in the filter's order (empty when kept).
    pa.field("failed", pa.list_(pa.string())),
])


class SchemaVersionError(ValueError):
    """A Parquet file was written with a schema this code does not read."""


def check_schema_version(schema: pa.Schema, expected_name: str, path: str = "") -> None:
    """Raise :class:`SchemaVersionError` unless ``schema`` is our ``expected_name`` layout, current version."""
    metadata = schema.metadata or {}
    name = metadata.get(_NAME_KEY, b"").decode()
    version = metadata.get(_VERSION_KEY, b"").decode()
    where = f"{path}: " if path else ""
    if name != expected_name:
        raise SchemaVersionError(f"{where}expected an icl-cluster-pipeline '{expected_name}' file, "
                                 f"found schema name {name or 'none'!r}")
    if version != str(SCHEMA_VERSION):
        raise SchemaVersionError(f"{where}'{expected_name}' schema version {version or 'none'} is not "
                                 f"supported by this reader (it reads version {SCHEMA_VERSION})")


def _embedding_to_list(embedding: Any) -> list[float] | None:
    if embedding is None:
        return None
    return [float(x) for x in embedding]


def image_to_row(image: ImageRecord) -> dict[str, Any]:
    return {
        "image_id": image.image_id,
        "record_id": image.record_id,
        "source": image.source,
        "image_url": image.image_url,
        "image": image_cell(image.image),
        "width": image.width,
        "height": image.height,
        "source_width": image.source_width,
        "source_height": image.source_height,
        "source_format": image.source_format,
        "text": image.text,
        "text_truncated": image.text_truncated,
        "caption": image.caption,
        "phash": image.phash,
        "embedding": _embedding_to_list(image.embedding),
        "coherence": image.coherence,
        "face_count": image.face_count,
        "face_share": image.face_share,
        "faces_blurred": image.faces_blurred,
        "nsfw_score": image.nsfw_score,
    }


def cluster_to_row(cluster: Cluster) -> dict[str, Any]:
    """The row of ``clusters/*.parquet`` for a cluster (a dict matching :data:`CLUSTERS_SCHEMA`)."""
    return {
        "cluster_id": cluster.cluster_id,
        "page_url": cluster.page_url,
        "domain": cluster.domain,
        "subject": cluster.subject,
        "class_noun": cluster.class_noun,
        "is_live": cluster.is_live,
        "images": [image_to_row(image) for image in cluster.images],
        "stats": {
            "n_images": cluster.stats.n_images,
            "n_page_images": cluster.stats.n_page_images,
            "mean_sim": cluster.stats.mean_sim,
            "min_sim": cluster.stats.min_sim,
        },
        "prompts": [{"prompt": p.prompt, "skill": p.skill} for p in cluster.prompts],
        "provenance": {
            "caption_backend": cluster.provenance.caption_backend,
            "subject_backend": cluster.provenance.subject_backend,
            "prompts_backend": cluster.provenance.prompts_backend,
            "fallbacks": list(cluster.provenance.fallbacks),
            **{name: getattr(cluster.provenance, name) for name in _PROVENANCE_NAMES},
        },
    }


def cluster_from_row(row: dict[str, Any]) -> Cluster:
    """Inverse of :func:`cluster_to_row` (embeddings come back as float32 numpy vectors)."""
    import numpy as np

    images = []
    for im in row["images"]:
        embedding = im.get("embedding")
        images.append(ImageRecord(
            image_id=im["image_id"],
            record_id=im.get("record_id") or "",
            source=im.get("source") or "",
            page_url=row["page_url"],
            domain=row["domain"],
            image_url=im.get("image_url"),
            text=im.get("text"),
            image=image_bytes(im["image"]),
            width=im["width"],
            height=im["height"],
            phash=im.get("phash") or "",
            source_width=im.get("source_width") or im["width"],
            source_height=im.get("source_height") or im["height"],
            source_format=im.get("source_format") or "",
            caption=im.get("caption"),
            embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32),
            coherence=im.get("coherence"),
            face_count=im.get("face_count"),
            face_share=im.get("face_share"),
            faces_blurred=im.get("faces_blurred"),
            nsfw_score=im.get("nsfw_score"),
            text_truncated=bool(im.get("text_truncated")),
        ))
    stats = row["stats"]
    provenance = row.get("provenance") or {}
    return Cluster(
        cluster_id=row["cluster_id"],
        page_url=row["page_url"],
        domain=row["domain"],
        images=tuple(images),
        stats=ClusterStats(
            n_images=stats["n_images"],
            n_page_images=stats.get("n_page_images") or stats["n_images"],
            mean_sim=stats.get("mean_sim"),
            min_sim=stats.get("min_sim"),
        ),
        subject=row.get("subject"),
        class_noun=row.get("class_noun"),
        is_live=row.get("is_live"),
        prompts=tuple(Prompt(p["prompt"], p["skill"]) for p in (row.get("prompts") or [])),
        provenance=ClusterProvenance(
            caption_backend=provenance.get("caption_backend"),
            subject_backend=provenance.get("subject_backend"),
            prompts_backend=provenance.get("prompts_backend"),
            fallbacks=tuple(provenance.get("fallbacks") or ()),
            **{name: provenance.get(name) for name in _PROVENANCE_NAMES},
        ),
    )


def reject_to_row(reject: Reject) -> dict[str, Any]:
    """The row of ``rejects/*.parquet`` for a reject (a dict matching :data:`REJECTS_SCHEMA`)."""
    return {
        "id": reject.id,
        "stage": reject.stage,
        "reason": reject.reason,
        "detail": reject.detail,
        "page_url": reject.page_url,
        "image_url": reject.image_url,
        "n_images": reject.n_images,
        "source": reject.source,
        "cluster_id": reject.cluster_id,
        "image_ids": list(reject.image_ids),
        "record_ids": list(reject.record_ids),
    }


def reject_from_row(row: dict[str, Any]) -> Reject:
    fields = {name: row.get(name) for name in REJECTS_SCHEMA.names}
    for name in ("image_ids", "record_ids"):  # lists in Parquet, tuples in the record
        fields[name] = tuple(fields[name] or ())
    return Reject(**fields)


# --- candidates (phase 2) ------------------------------------------------------------------------------

TRAIN_SETTINGS_TYPE = pa.struct([
    pa.field("model", pa.string()),
    pa.field("mode", pa.string()),
    pa.field("steps", pa.int32()),
    pa.field("learning_rate", pa.float64()),
    pa.field("lora_rank", pa.int32()),
    pa.field("train_text_encoder", pa.bool_()),
    pa.field("batch_size", pa.int32()),
    pa.field("resolution", pa.int32()),
    pa.field("prior_preservation", pa.bool_()),
    pa.field("prior_loss_weight", pa.float32()),
    pa.field("precision", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("instance_prompt", pa.string()),
])

SAMPLE_SETTINGS_TYPE = pa.struct([
    pa.field("scheduler", pa.string()),
    pa.field("steps", pa.int32()),
    pa.field("guidance_scale", pa.float32()),
    pa.field("negative_prompt", pa.string()),
    pa.field("images_per_prompt", pa.int32()),
])

SYNTH_SECONDS_TYPE = pa.struct([pa.field(name, pa.float32()) for name in
                                ("load", "latents", "prior", "train", "sample", "cleanup", "total")])

CANDIDATES_SCHEMA = _with_metadata("candidates", [
    pa.field("candidate_id", pa.string(), nullable=False),
    pa.field("cluster_id", pa.string(), nullable=False),
    pa.field("page_url", pa.string()),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("prompt_template", pa.string(), nullable=False),
    pa.field("skill", pa.string()),
    pa.field("subject", pa.string()),
    pa.field("class_noun", pa.string()),
    pa.field("identifier", pa.string()),
    pa.field("k", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("image", IMAGE_TYPE, nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("nsfw", pa.bool_()),
    pa.field("train", TRAIN_SETTINGS_TYPE),
    pa.field("sample", SAMPLE_SETTINGS_TYPE),
    pa.field("final_loss", pa.float32()),
    pa.field("n_train_images", pa.int32()),
    pa.field("seconds", SYNTH_SECONDS_TYPE),
    pa.field("synth_config_hash", pa.string()),
])


def candidate_to_row(candidate: Candidate) -> dict[str, Any]:
    """The row of ``candidates/*.parquet`` for a candidate (a dict matching :data:`CANDIDATES_SCHEMA`)."""
    row = {name: getattr(candidate, name) for name in CANDIDATES_SCHEMA.names
           if name not in ("train", "sample", "seconds")}
    row["image"] = image_cell(candidate.image)
    row["train"] = dataclasses.asdict(candidate.train)
    row["sample"] = dataclasses.asdict(candidate.sample)
    row["seconds"] = dataclasses.asdict(candidate.seconds)
    return row


def candidate_from_row(row: dict[str, Any]) -> Candidate:
    """Inverse of :func:`candidate_to_row`."""
    fields = {name: row.get(name) for name in CANDIDATES_SCHEMA.names if name not in ("train", "sample", "seconds")}
    fields["image"] = image_bytes(fields["image"])
    return Candidate(**fields, train=TrainSettings(**row["train"]), sample=SampleSettings(**row["sample"]),
                     seconds=SynthSeconds(**row["seconds"]))


# --- examples and scores (phase 3) -----------------------------------------------------------------------

def scores_to_row(scores: TargetScores) -> dict[str, Any]:
    return dataclasses.asdict(scores)


def example_to_row(example: Example) -> dict[str, Any]:
    """The row of ``examples/*.parquet`` for an example (a dict matching :data:`EXAMPLES_SCHEMA`)."""
    scored = example.target
    candidate = scored.candidate
    provenance = dataclasses.asdict(example.provenance)
    provenance["fallbacks"] = list(example.provenance.fallbacks)
    return {
        "example_id": example.example_id,
        "cluster_id": example.cluster_id,
        "page_url": example.page_url,
        "subject": example.subject,
        "class_noun": example.class_noun,
        "demos": [{**dataclasses.asdict(demo), "image": image_cell(demo.image)} for demo in example.demos],
        "target": {
            "candidate_id": candidate.candidate_id,
            "image": image_cell(candidate.image),
            "prompt": scored.prompt,
            "prompt_template": candidate.prompt_template,
            "rendered_prompt": candidate.prompt,
            "skill": candidate.skill,
            "seed": candidate.seed,
            "k": candidate.k,
            "width": candidate.width,
            "height": candidate.height,
            "source_image_id": scored.source_image_id,
        },
        "scores": scores_to_row(scored.scores),
        "provenance": provenance,
    }


def target_scores_row(scored: ScoredCandidate, decision: str, failed: Sequence[str]) -> dict[str, Any]:
    """The row of ``scores/*.parquet`` for a scored candidate and the filter's decision about it."""
    return {
        "candidate_id": scored.candidate.candidate_id,
        "cluster_id": scored.candidate.cluster_id,
        "skill": scored.candidate.skill,
        "prompt": scored.prompt,
        "source_image_id": scored.source_image_id,
        "scores": scores_to_row(scored.scores),
        "decision": decision,
        "failed": list(failed),
    }
