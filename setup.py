"""Packaging for icl-cluster-pipeline.

The same file serves two purposes:

* ``pip install -e '.[dev]'`` on a developer machine or CI, and
* ``--setup_file ./setup.py`` for Beam runners (Dataflow, Flink, Spark), which build an sdist from it
  and install it on every remote worker, so the workers get exactly our packages.

Keep ``BEAM_VERSION`` in step with ``ARG BEAM_VERSION`` in the Dockerfile: the worker image copies the
Beam SDK boot of that version, and a launcher and workers on different Beam versions fail in odd ways.
``tests/test_packaging.py`` checks that they agree.
"""

from setuptools import find_packages, setup

BEAM_VERSION = "2.77.0"

VERSION = "0.1.0"

# Phase 1 without models: reading (files, WARC pages, document rows), fetching, normalizing, grouping,
# deduplicating and writing Parquet.
INSTALL_REQUIRES = [
    f"apache-beam=={BEAM_VERSION}",
    "pyarrow>=14",
    "pillow>=10.1",
    "imagehash>=4.3",
    "opencv-python-headless>=4.8,<5",  # JPEG decode/resize/encode in normalize; 5.x has no CascadeClassifier
    "w3lib>=2.1",
    "numpy>=1.24",
    "pyyaml>=6",
    "aiohttp>=3.9",
    "warcio>=1.7",
    "protego>=0.3",
    "selectolax>=0.3",
]

# Everything that runs a model: CLIP embeddings (open_clip), DreamBooth synthesis (diffusers + peft).
MODELS_REQUIRE = [
    "torch>=2.4",
    "torchvision>=0.19",
    "open_clip_torch>=2.26",
    "diffusers>=0.31",
    "transformers>=4.44",
    "peft>=0.13",
    "safetensors>=0.4",
    # faces and NSFW (the detector ships its weights in the wheel), semantic dedup's k-means
    "nudenet>=3.4",
    "onnxruntime>=1.17",
    "scikit-learn>=1.3",
]

EXTRAS_REQUIRE = {
    "models": MODELS_REQUIRE,
    # Google Cloud IO (gs://) and the Dataflow runner.
    "gcp": [f"apache-beam[gcp]=={BEAM_VERSION}"],
    # Amazon S3 IO (s3://).
    "aws": [f"apache-beam[aws]=={BEAM_VERSION}"],
    # A vLLM server started on each GPU worker (not needed to talk to an existing endpoint).
    "vllm": ["vllm>=0.6"],
    "dev": MODELS_REQUIRE
    + [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "ruff>=0.6",
        "datasets>=2.19",
    ],
}

setup(
    name="icl-cluster-pipeline",
    version=VERSION,
    description=(
        "Apache Beam pipeline that turns crawled image-text pairs into in-context-learning clusters and "
        "synthesized training examples for subject-driven text-to-image models (the SuTI recipe)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*", "schemas",
                                    "schemas.*", "dreambooth_synth", "dreambooth_synth.*"]),
    package_data={
        "pipeline": ["profiles/*.yaml"],
        "transforms": ["llm_prompts/*.txt", "llm_prompts/*.json"],
    },
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["icl-pipeline=pipeline.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
