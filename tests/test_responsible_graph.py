"""The safety, semantic-dedup and render-NSFW stages in the stage registry: their places in the phases, their
switches, their reasons (declared and documented), and phase 1 of the demo profile through the command flow on the
bundled sample (every input record kept or rejected with a reason; the stages' figures in the manifest, the console
funnel and the report)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from pipeline.accounting import whole_cluster_reasons
from pipeline.config import ConfigError, build_config
from pipeline.console import funnel_table
from pipeline.phases import ASSEMBLE, CLUSTERS, PHASES, safety_enabled
from tests.conftest import PhaseOutput

REASONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "reasons.md"


def labels(phase) -> list[str]:
    return [stage.label for stage in phase.stages]


def test_the_stages_sit_where_the_design_puts_them() -> None:
    phase1, phase3 = labels(CLUSTERS), labels(ASSEMBLE)
    assert phase1.index("Dedupe") + 1 == phase1.index("Safety") == phase1.index("Embed") - 1
    assert phase1.index("CrossPageDedupe") + 1 == phase1.index("SemanticDedup") == phase1.index("Decontaminate") - 1
    assert phase3.index("Score") + 1 == phase3.index("FlagNsfwTargets") == phase3.index("TargetFilter") - 1


def test_reasons_are_declared_whole_cluster_and_documented() -> None:
    whole = whole_cluster_reasons(CLUSTERS)
    assert {"person_subject", "semantic_duplicate_cluster", "cluster_too_small"} <= whole
    assert not {"nsfw_input", "semantic_duplicate_image"} & whole
    documented = set(re.findall(r"^\|(?: \d+ \|)? (\w+) \| `(\w+)` \|", REASONS_DOC.read_text(), flags=re.MULTILINE))
    for phase in PHASES.values():
        for stage in (phase.source, *phase.stages):
            for module in (stage.module, *stage.also):
                for reason in module.REASONS:
                    assert (module.STAGE, reason.code) in documented, (phase.name, module.STAGE, reason.code)


def test_switches() -> None:
    demo = build_config("demo")
    assert all(stage.enabled(demo) for stage in CLUSTERS.stages if stage.label in ("Safety", "SemanticDedup"))
    assert next(s for s in ASSEMBLE.stages if s.label == "FlagNsfwTargets").enabled(demo)
    assert demo.detector.model is None  # the real weights of the nudenet wheel
    off = build_config("demo", overrides=["detector.enabled=false"])
    assert not safety_enabled(off) and not next(s for s in ASSEMBLE.stages if s.label == "FlagNsfwTargets").enabled(off)
    # Nothing to decide: no NSFW check, people kept unblurred.
    idle = build_config("demo", overrides=["nsfw.enabled=false", "people.policy=keep",
                                           "people.blur_incidental_faces=false"])
    assert not safety_enabled(idle)
    assert safety_enabled(build_config("demo", overrides=["nsfw.enabled=false"]))  # people policy alone
    with pytest.raises(ConfigError, match="semantic_dedup.enabled needs embeddings"):
        build_config("demo", overrides=["embed.enabled=false", "cluster_filter.enabled=false"])
    config = build_config("demo", overrides=["embed.enabled=false", "cluster_filter.enabled=false",
                                             "semantic_dedup.enabled=false"])
    assert not config.semantic_dedup.enabled
    with pytest.raises(ConfigError, match="detector.model"):
        from pipeline.run import check_stage_resources

        check_stage_resources(build_config("demo", overrides=["detector.model=/nonexistent/320n.onnx"]))


@pytest.mark.slow
def test_demo_phase1_runs_the_new_stages_and_reconciles(sample_phase1: PhaseOutput) -> None:
    """The demo profile's phase 1 (the session's shared run): the detector (real NudeNet weights) and semantic dedup
    (the tiny CLIP) ran on the sample, every record is accounted for, and their figures reach the console and the
    manifest."""
    manifest = sample_phase1.manifest
    records = manifest["records"]
    assert records["reconciled"] and records["input"] == records["kept"] + sum(records["rejected"].values())
    counters = manifest["phases"]["clusters"]["counters"]
    safety, semantic = counters["safety"], counters["semantic_dedup"]
    # No person and nothing explicit in the DreamBench sample: the safety stage keeps every image, unchanged.
    assert "safety" not in manifest["phases"]["clusters"]["rejects_by_stage"]
    assert safety.get("faces", 0) == 0 and safety["images_checked"] == sum(
        v for k, v in safety.items() if k.startswith("nsfw_score_bin_"))
    kept = [image for cluster in sample_phase1.clusters() for image in cluster["images"]]
    assert kept and all(im["face_count"] == 0 and im["faces_blurred"] == 0 and im["nsfw_score"] < 0.7
                        for im in kept)
    # Semantic dedup compared every kept cluster and image; at the demo's 0.9999 the sample's distinct photos stay.
    assert semantic["cluster_items"] == manifest["clusters"]["written"]
    assert semantic["image_items"] == records["kept"]
    assert "semantic_dedup" not in manifest["phases"]["clusters"]["rejects_by_stage"]
    text = funnel_table(manifest, "clusters")
    assert f"of {safety['images_checked']:,} images checked" in text and "semantic duplicates: 0 groups" in text


def write_crawl(path: Path, pages: dict[str, list[bytes]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"page_url": page, "image_url": f"{page}/img/{i}.jpg", "text": f"photo {i}", "image": data}
            for page, photos in pages.items() for i, data in enumerate(photos)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.slow
def test_new_rejects_reach_the_funnel_the_console_and_the_report(product_photos: list[bytes],
                                                                  tmp_path: Path) -> None:
    """A crawl with a page of portraits (public-domain scikit-image photos) and a photo re-encoded on a second shop:
    the person cluster and the copy leave with their reasons, and the manifest's funnel, the console table and the
    report show them and the stages' figures."""
    from pipeline.report import build_report
    from tests.conftest import run_pipeline
    from tests.test_safety import jpeg, photo

    astronaut = photo("astronaut.jpg")
    portraits = [jpeg(astronaut), jpeg(photo("camera.jpg")),
                 jpeg(astronaut.crop((60, 20, 452, 412)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)), product_photos[3]]
    p = product_photos
    copy = jpeg(Image.open(io.BytesIO(p[0])).convert("RGB"))  # re-encoded at quality 92, same size
    crawl = write_crawl(tmp_path / "crawl.parquet", {
        "https://people.example.com/eileen": portraits,
        "https://shop.example.com/products/a": [p[0], p[1], p[2], p[4]],
        "https://other.example.net/products/b": [copy, p[5], p[6], p[7]],
    })
    out = run_pipeline([crawl], tmp_path / "out", "--profile", "demo", "--set", "cluster_filter.enabled=false",
                       "--set", "detector.resolution=640")
    manifest = out.manifest
    rejected = manifest["records"]["rejected"]
    assert manifest["records"]["reconciled"] and manifest["records"]["input"] == 12
    assert rejected == {"person_subject": 4, "semantic_duplicate_image": 1}
    assert manifest["clusters"] == {"written": 2, "rejected": {"person_subject": 1}}
    assert manifest["funnel"][1]["rejected"] == rejected
    counters = manifest["phases"]["clusters"]["counters"]
    assert counters["safety"]["person_subject_clusters"] == 1 and counters["safety"]["faces"] >= 2
    assert counters["semantic_dedup"]["duplicate_groups_image"] == 1
    text = funnel_table(manifest, "clusters")
    assert "person_subject" in text and "semantic_duplicate_image" in text
    assert "clusters dropped as person_subject: 1" in text and "person clusters 1 (1 dropped)" in text
    assert "1 groups of images (1 images dropped)" in text
    page = build_report(str(out.output), manifest=manifest)
    funnel = re.search(r'<section id="funnel">.*?</section>', page).group(0)
    assert "person_subject (whole clusters)" in funnel and "semantic_duplicate_image" in funnel
    responsible = re.search(r'<section id="responsible">.*?</section>', page).group(0)
    assert re.search(r"person clusters dropped \(people.policy drop\)</th><td class='num'>1<", responsible)
    assert re.search(r"images dropped \(semantic_duplicate_image\)</th><td class='num'>1<", responsible)
    assert "NSFW score of the crawled photos" in responsible
