"""The dataset card ``OUT/README.md``: what the examples are, their schema, how they were made and filtered,
the counts at every step and per reason, the thresholds, and the licences of the inputs.

It is written from ``manifest.json`` (what the run did) and :data:`schemas.parquet.EXAMPLES_SCHEMA`, with a
Hugging Face dataset-card header, so the output folder can be pushed to the Hub as it is
(``load_dataset("parquet")`` reads ``examples/*.parquet``).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.config import CardConfig
from pipeline.console import cluster_filter_note, target_filter_note

CARD = "README.md"


EXAMPLE_FIELDS: dict[str, str] = {
    "example_id": "stable id: hash of the target's candidate id and the demos' image ids",
    "cluster_id": "the cluster (page) the demos and the target's subject come from",
    "page_url": "canonical URL of the page the real images were found on",
    "subject": "the cluster's subject phrase (may be empty)",
    "class_noun": "the subject's class noun (may be empty)",
    "demos": "the real demonstrations (`assemble.demos`, 3 by default), never the target's source image",
    "demos.image_id": "content hash of the demo image",
    "demos.image": "the demo image, normalized (JPEG by default)",
    "demos.image.bytes": "its encoded bytes (a Hugging Face `Image` feature: `load_dataset` gives a PIL image)",
    "demos.image.path": "always null (the bytes are in the file)",
    "demos.caption": "its caption (recaptioned, or cleaned alt text)",
    "demos.width": "width in pixels",
    "demos.height": "height in pixels",
    "target": "the synthesized target",
    "target.candidate_id": "id of the rendered candidate (`candidates/`, `scores/`)",
    "target.image": "the rendered image (PNG by default)",
    "target.image.bytes": "its encoded bytes (a Hugging Face `Image` feature)",
    "target.image.path": "always null (the bytes are in the file)",
    "target.prompt": "the prompt for training: the scene with the subject phrase, no identifier token",
    "target.prompt_template": "the scene prompt with its `{subject}` placeholder",
    "target.rendered_prompt": "what the per-cluster DreamBooth rendered, with its identifier token",
    "target.skill": "the skill the prompt exercises (recontextualization, stylization, ...)",
    "target.seed": "seed of the render",
    "target.k": "which render of the prompt (0-based)",
    "target.width": "width in pixels",
    "target.height": "height in pixels",
    "target.source_image_id": "the real image the target is nearest to (CLIP), excluded from the demos",
    "scores": "scores of the target (docs/reasons.md, phase 3)",
    "scores.subject_sim": "mean CLIP image similarity to the cluster's real images",
    "scores.subject_sim_max": "CLIP image similarity to the nearest real image (copy check)",
    "scores.text_sim": "CLIP image-text similarity to `target.prompt`",
    "scores.copy_distance": "smallest perceptual-hash distance (bits of 64) to a real image",
    "scores.brightness": "mean luma, 0-1",
    "scores.contrast": "standard deviation of the luma, 0-0.5",
    "scores.sharpness": "variance of the Laplacian of the luma",
    "scores.nsfw_score": "highest score of the NSFW detector's checked classes (NudeNet), 0-1; null when not checked",
    "provenance": "what produced the example",
    "provenance.pipeline_version": "icl-cluster-pipeline version",
    "provenance.config_hash": "hash of the configuration of the run that assembled it (manifest.json)",
    "provenance.clip_model": "CLIP model that scored the target",
    "provenance.synth_model": "base model of the DreamBooth that rendered the target",
    "provenance.synth_config_hash": "hash of the synthesis settings",
    "provenance.caption_backend": "how the captions were made",
    "provenance.caption_model": "captioning model (none for an offline backend)",
    "provenance.caption_prompt": "instruction file of the captions (name@sha256)",
    "provenance.subject_backend": "how the subject was derived",
    "provenance.subject_model": "subject model",
    "provenance.subject_prompt": "instruction file of the subject",
    "provenance.prompts_backend": "how the scene prompts were written",
    "provenance.prompts_model": "prompt-writing model",
    "provenance.prompts_prompt": "instruction or template file of the scene prompts",
    "provenance.fallbacks": "stages that fell back to their offline backend for this cluster",
}


def schema_fields(schema: pa.Schema) -> list[tuple[str, str]]:
    """``(dotted name, type)`` of every field and struct member (lists of structs by their members)."""
    out: list[tuple[str, str]] = []

    def walk(prefix: str, dtype: pa.DataType) -> None:
        inner = dtype.value_type if pa.types.is_list(dtype) else dtype
        if pa.types.is_struct(inner):
            for child in inner:
                name = f"{prefix}.{child.name}"
                out.append((name, _type_name(child.type)))
                walk(name, child.type)

    for field in schema:
        out.append((field.name, _type_name(field.type)))
        walk(field.name, field.type)
    return out


def _type_name(dtype: pa.DataType) -> str:
    if pa.types.is_list(dtype):
        inner = dtype.value_type
        return "list<struct>" if pa.types.is_struct(inner) else f"list<{inner}>"
    return "struct" if pa.types.is_struct(dtype) else str(dtype)


def is_tiny_run(manifest: dict[str, Any]) -> bool:
    """Whether the run used the tiny random-weight models (scores and renders meaningless by construction)."""
    config = manifest.get("config", {})
    models = (config.get("embed", {}).get("model"), config.get("synth", {}).get("model", {}).get("name"))
    return manifest.get("profile") == "demo" or any(m and "tiny-random" in str(m) for m in models)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


FOLDERS = (
    ("examples/*.parquet", "the examples"),
    ("scores/*.parquet", "every scored candidate with its scores and the filter's decision"),
    ("clusters/*.parquet", "the real image clusters (phase 1)"),
    ("candidates/*.parquet", "every rendered target (phase 2)"),
    ("rejects/*.parquet", "every record, cluster or candidate that left, with its reason"),
    ("report/index.html", "funnel, score histograms with thresholds, galleries"),
    ("manifest.json", "configuration, versions, counts, thresholds, timings"),
)


def dataset_card(manifest: dict[str, Any], config: CardConfig, present: set[str] | None = None) -> str:
    """The card's Markdown text (with a Hugging Face YAML header). ``present``: the entries of :data:`FOLDERS`
    the output holds (all when ``None``)."""
    from pipeline.accounting import departures
    from schemas.parquet import EXAMPLES_SCHEMA

    run_config = manifest.get("config", {})
    phases = manifest.get("phases", {})
    candidates = manifest.get("candidates") or {}
    n_examples = candidates.get("examples", 0)
    assemble = phases.get("assemble", {})
    parts = [
        "---",
        f"pretty_name: {_yaml_string(config.title)}",
        f"license: {config.license.strip()}",
        "task_categories:\n- text-to-image",
        "tags:\n- subject-driven-generation\n- in-context-learning\n- synthetic",
        "configs:\n- config_name: default\n  data_files: examples/*.parquet",
        "---",
        "",
        f"# {config.title}",
        "",
    ]
    if is_tiny_run(manifest):
        parts += ["> **Demo run with tiny random-weight models.** The CLIP scores and the rendered targets of this run",
                  "> are meaningless by construction: it shows what the pipeline produces, not usable training data.",
                  ""]
    parts += [
        f"{n_examples:,} in-context-learning training examples for subject-driven text-to-image models (the SuTI "
        "recipe). Each example is a few **real photos of one subject** (the demos, with captions) and one "
        "**synthesized target**: the same subject rendered in a new scene by a DreamBooth fine-tuned on that "
        "subject's photos, with the prompt that describes the scene. A model trained on them learns to draw a "
        "subject it sees in the demos into the scene the prompt asks for, without per-subject fine-tuning.",
        "",
        f"Made by icl-cluster-pipeline {manifest.get('version') or ''} on {manifest.get('created', '?')} "
        f"(profile `{manifest.get('profile')}`, runner {manifest.get('runner')}, config hash "
        f"`{manifest.get('config_hash')}`; everything about the run is in `manifest.json`).",
        "",
        "## Files",
        "",
        _table(["path", "holds"], [
            [f"`{path}`", holds + (f" ({assemble.get('examples', {}).get('files', 0)} file(s), "
                                   f"{assemble.get('examples', {}).get('row_groups', 0)} row group(s))"
                                   if path.startswith("examples") else "")]
            for path, holds in FOLDERS if present is None or path in present]),
        "",
        "## Schema of `examples/*.parquet`",
        "",
        _table(["column", "type", "meaning"],
               [[f"`{name}`", f"`{dtype}`", EXAMPLE_FIELDS.get(name, "")] for name, dtype in
                schema_fields(EXAMPLES_SCHEMA)]),
        "",
        "Image columns are Hugging Face `Image` features (`{bytes, path}` structs, the `datasets` features stored in "
        "each file), so `datasets` returns PIL images and the Hub viewer shows them:",
        "",
        "```python",
        "import datasets",
        "ds = datasets.load_dataset(\"parquet\", data_files=\"examples/*.parquet\", split=\"train\")",
        "ds[0][\"target\"][\"image\"]   # a PIL image",
        "```",
        "",
        "Or the pipeline's own reader, which streams row groups and splits them across ranks and DataLoader workers. "
        "The pipeline is not on PyPI: install it from a checkout of its repository (the reader itself needs only "
        "pyarrow and Pillow, and torch for the `IterableDataset`):",
        "",
        "```sh",
        "git clone <the pipeline's repository>",
        "pip install pyarrow pillow && pip install --no-deps ./icl-cluster-pipeline",
        "```",
        "",
        "```python",
        "from schemas.reader import ExamplesDataset, iter_examples",
        "dataset = ExamplesDataset(\"examples/*.parquet\", decode=\"tensor\")",
        "loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=4)",
        "```",
        "",
        "## How it was made",
        "",
    ]
    parts += _how_made(run_config, assemble)
    parts += _cost(manifest)
    parts += ["", "## Counts", "", "From input records to examples (each step's count, and what left before it):",
              ""]
    funnel_rows = []
    for step in manifest.get("funnel", []):
        left = departures(step)
        funnel_rows.append([step["step"], step["count"], step["unit"],
                            ", ".join(f"{reason} {n:,}" for reason, n in sorted(left.items(), key=lambda kv: -kv[1]))])
    parts.append(_table(["step", "count", "unit", "left here, by reason"], funnel_rows))
    parts += ["", "Rejects per phase, stage and reason (records for phase 1, clusters for phase 2, candidates for "
              "phase 3; reasons are documented in the pipeline's docs/reasons.md):", ""]
    reject_rows = []
    for phase, summary in phases.items():
        for stage, reasons in summary.get("rejects_by_stage", {}).items():
            for reason, n in sorted(reasons.items()):
                reject_rows.append([phase, stage, reason, n])
        if phase == "synthesize":
            for reason, n in sorted(summary.get("clusters", {}).get("rejected", {}).items()):
                reject_rows.append([phase, "synthesize", reason, n])
    parts.append(_table(["phase", "stage", "reason", "count"], reject_rows) if reject_rows else "No rejects.")
    parts += ["", "## Thresholds", ""]
    parts += _thresholds(manifest)
    parts += ["", "## Licences", ""]
    if config.license.strip() == "unknown" and not config.license_note.strip():
        parts.append("The licences of the input images and texts are **unknown**: they were crawled from the web and "
                     "belong to their owners unless stated otherwise. Check the terms of the sources before using or "
                     "sharing this data. (Set `card.license` and `card.license_note` to record them.)")
    else:
        parts.append(f"Licence of the inputs: `{config.license.strip()}`.")
        if config.license_note.strip():
            parts += ["", config.license_note.strip()]
    parts += ["", "The synthesized targets were rendered by "
              f"`{run_config.get('synth', {}).get('model', {}).get('name', '?')}`; its licence applies to them.", ""]
    return "\n".join(parts)


def _how_made(run_config: dict[str, Any], assemble: dict[str, Any]) -> list[str]:
    embed = run_config.get("embed", {})
    synth = run_config.get("synth", {})
    train = synth.get("train", {})
    sample = synth.get("sample", {})
    lines = [
        "1. **Clusters** (phase 1): crawled image-text pairs are grouped by the canonical URL of their page, "
        "deduplicated, embedded with CLIP "
        f"(`{embed.get('model')}` / `{embed.get('pretrained') or embed.get('checkpoint') or 'random'}`) and kept "
        "when the images of a page show one subject (mean pairwise similarity over the coherence threshold); "
        "every image is recaptioned "
        f"(`{run_config.get('caption', {}).get('backend')}`), a subject is derived "
        f"(`{run_config.get('subject', {}).get('backend')}`) and scene prompts are written across skills "
        f"(`{run_config.get('prompts', {}).get('backend')}`).",
        f"2. **Synthesis** (phase 2): per cluster, a DreamBooth ({train.get('mode')}, {train.get('steps')} steps, "
        f"learning rate {train.get('learning_rate')}) of `{synth.get('model', {}).get('name')}` is fine-tuned on "
        f"the cluster's photos and renders each prompt {sample.get('images_per_prompt')} time(s) "
        f"({sample.get('scheduler')}, {sample.get('steps')} steps, guidance {sample.get('guidance_scale')}).",
        "3. **Scoring, filtering, assembly** (phase 3): every render is scored (CLIP similarity to the subject's "
        "photos and to its prompt, copy distance to the photos, image quality heuristics"
        + (", NSFW detector" if _nsfw_checked(run_config) else "") + "), the renders that pass "
        "every bound are kept, and each becomes an example with "
        f"{run_config.get('assemble', {}).get('demos', 3)} real demos of its subject, never the photo it is "
        "nearest to.",
    ]
    lines += _responsible_lines(run_config)
    if assemble.get("clip_model"):
        lines.append(f"\nScoring model: `{assemble['clip_model']}`.")
    return lines


def _nsfw_checked(run_config: dict[str, Any]) -> bool:
    return bool(run_config.get("detector", {}).get("enabled") and run_config.get("nsfw", {}).get("enabled"))


def _responsible_lines(run_config: dict[str, Any]) -> list[str]:
    """What the run did about people, explicit photos and duplicates across the dataset (docs/safety.md)."""
    people, nsfw = run_config.get("people", {}), run_config.get("nsfw", {})
    semantic = run_config.get("semantic_dedup", {})
    lines = ["", "Responsible data:", ""]
    if run_config.get("detector", {}).get("enabled"):
        policy = ("clusters whose subject is a person (a prominent face in at least "
                  f"{people.get('person_image_fraction')} of their photos) were dropped"
                  if people.get("policy") == "drop" else "clusters whose subject is a person were kept (people.policy "
                  "keep)")
        blur = "; faces that are not a cluster's subject were blurred" if people.get("blur_incidental_faces") else ""
        lines.append(f"- **People**: faces were detected with NudeNet, confirmed by OpenCV's Haar cascades; {policy}"
                     f"{blur}.")
        lines.append("- **NSFW**: " + ("crawled photos and renders that NudeNet scores at or over a class threshold "
                                       "were removed." if nsfw.get("enabled") else "not checked (nsfw.enabled false)."))
        lines.append("- The detector misses small, turned and occluded faces and rates no drawn material, violence or "
                     "age: see the pipeline's docs/safety.md.")
    else:
        lines.append("- **People and NSFW**: not checked (detector.enabled false); renders passed only the base "
                     "model's safety checker.")
    if semantic.get("enabled"):
        lines.append(f"- **Semantic duplicates** across the dataset (CLIP embeddings, SemDeDup-style): clusters at "
                     f"a similarity of at least {semantic.get('cluster_threshold')} and images at "
                     f"{semantic.get('image_threshold')} were removed, one of each group kept.")
    return lines


def _cost(manifest: dict[str, Any]) -> list[str]:
    """The synthesis cost of the run, in words (the manifest's ``cost`` block)."""
    run_cost = manifest.get("cost") or {}
    if not run_cost:
        return []
    line = (f"Synthesis took {run_cost['seconds_per_cluster']:.2f} device-seconds per cluster "
            f"({run_cost['hours_per_10000_clusters']:,.1f} device-hours per 10,000 clusters)")
    if run_cost.get("seconds_per_example"):
        line += (f" and {run_cost['seconds_per_example']:.2f} per kept example "
                 f"({run_cost['hours_per_100000_examples']:,.1f} device-hours per 100,000 examples)")
    return ["", line + f", on device `{run_cost.get('device')}`. Unit: {run_cost['unit']}."]


def _thresholds(manifest: dict[str, Any]) -> list[str]:
    config = manifest.get("config", {})
    phases = manifest.get("phases", {})
    rows: list[list[Any]] = []
    normalize, group, dedupe = config.get("normalize", {}), config.get("group", {}), config.get("dedupe", {})
    rows += [["normalize", "min_side", normalize.get("min_side")],
             ["normalize", "max_aspect_ratio", normalize.get("max_aspect_ratio")],
             ["group", "min_images", group.get("min_images")],
             ["dedupe", "near_duplicate_max_distance", dedupe.get("near_duplicate_max_distance")]]
    cluster_filter = phases.get("clusters", {}).get("stats", {}).get("cluster_filter")
    if cluster_filter:
        mode = cluster_filter.get("mode")
        note = (f" (calibrated: keep rate {cluster_filter.get('target_keep_rate')})"
                if mode == "target_keep_rate" else "")
        rows.append(["cluster_filter", f"coherence_threshold{note}", _off(cluster_filter.get("coherence_threshold"))])
        if mode == "target_keep_rate":
            rows.append(["cluster_filter", "floor (coherence_threshold)", _off(cluster_filter.get("floor"))])
        rows.append(["cluster_filter", "outlier_threshold", _off(cluster_filter.get("outlier_threshold"))])
    if config.get("detector", {}).get("enabled"):
        people, nsfw = config.get("people", {}), config.get("nsfw", {})
        rows += [["safety", "people.policy", people.get("policy")],
                 ["safety", "people.prominent_face_share", people.get("prominent_face_share")],
                 ["safety", "people.min_face_score", people.get("min_face_score")]]
        if nsfw.get("enabled"):
            rows += [["safety, nsfw_targets", f"nsfw.{name}", _off(value)] for name, value in sorted(nsfw.items())
                     if name != "enabled"]
    semantic = config.get("semantic_dedup", {})
    if semantic.get("enabled"):
        rows += [["semantic_dedup", "cluster_threshold", _off(semantic.get("cluster_threshold"))],
                 ["semantic_dedup", "image_threshold", _off(semantic.get("image_threshold"))]]
    target_filter = phases.get("assemble", {}).get("stats", {}).get("target_filter")
    if target_filter:
        calibrated = target_filter.get("mode") == "target_keep_rate"
        for key, value in target_filter.get("bounds", {}).items():
            note = (f" (calibrated: keep rate {target_filter.get('target_keep_rate')})"
                    if calibrated and key in ("min_subject_sim", "min_text_sim") else "")
            rows.append(["target_filter", f"{key}{note}", "off" if value is None else value])
            floor = target_filter.get("calibration", {}).get("floors", {}).get(key)
            if calibrated and floor is not None:
                rows.append(["target_filter", f"floor ({key})", _off(floor.get("floor"))])
    lines = [_table(["stage", "bound", "value"], rows)]
    notes = [note for note in (cluster_filter_note(cluster_filter or {}), target_filter_note(target_filter or {}))
             if note]
    if notes:
        lines += ["", "Calibrated bounds keep at most the requested share, never under their floors: "
                  + " ".join(notes)]
    candidates = manifest.get("candidates")
    if candidates and candidates.get("keep_rate") is not None:
        lines += ["", f"Share of rendered candidates that became examples: {100 * candidates['keep_rate']:.1f}%."]
    return lines


def _off(value: Any) -> Any:
    return "off" if value is None else value


def write_card(output_dir: str, manifest: dict[str, Any], config: CardConfig) -> str:
    """Write ``OUT/README.md``; returns its path."""
    from apache_beam.io.filesystems import FileSystems

    present = {path for path, _ in FOLDERS
               if FileSystems.match([FileSystems.join(output_dir, *path.split("/"))])[0].metadata_list}
    path = FileSystems.join(output_dir, CARD)
    with FileSystems.create(path) as handle:
        handle.write(dataset_card(manifest, config, present).encode("utf-8"))
    return path
