# syntax=docker/dockerfile:1
#
# Worker image for the GPU phase (synthesize) on Dataflow (custom container) and on Flink/Spark through
# Beam's portable runners; README.md "GPU workers" has the build and launch commands.
#
#   docker build -t icl-worker .                                   # CUDA PyTorch + the project + Beam boot
#   docker build --build-arg MODEL_ID=stable-diffusion-v1-5/stable-diffusion-v1-5 -t icl-worker .
#                                                                  # ... with the base model's weights baked in
#
# One Beam version everywhere: BEAM_VERSION must equal BEAM_VERSION in setup.py (tests/test_packaging.py
# checks it). A launcher and workers on different Beam or Python versions fail in odd ways, so launch
# from this image too (README.md).
ARG BEAM_VERSION=2.77.0
# A CUDA build of PyTorch on Python 3.11 (the Python of the Beam SDK image below); any newer
# pytorch/pytorch *-runtime tag on Python 3.11 works (the build checks the Python version).
ARG PYTORCH_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

FROM apache/beam_python3.11_sdk:${BEAM_VERSION} AS beam_sdk

FROM ${PYTORCH_IMAGE}
ARG BEAM_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/huggingface

WORKDIR /opt/icl-cluster-pipeline
COPY . .

# One layer: the project with its model and GCP extras, pinned by constraints.txt except for torch,
# torchvision and the CUDA libraries, which stay those of the CUDA base image; then a conflict check.
RUN python -c "import sys; assert sys.version_info[:2] == (3, 11), 'the Beam SDK image is Python 3.11, this base is ' + sys.version" \
    && grep -v -E '^(torch|torchvision|torchaudio|triton|nvidia-|cuda-)' constraints.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt ".[models,gcp]" \
    && rm /tmp/constraints.txt \
    && python -c "import apache_beam; v = apache_beam.__version__; assert v == '${BEAM_VERSION}', v" \
    && pip check

# Optional: bake the base model into the image, so hundreds of workers do not each download ~4 GB from
# the Hub at start-up (then run with HF_HUB_OFFLINE=1).
ARG MODEL_ID=""
RUN if [ -n "${MODEL_ID}" ]; then \
        python -c "from diffusers import DiffusionPipeline; DiffusionPipeline.download('${MODEL_ID}')"; \
    fi

# The Beam SDK worker harness of the same Beam version; Dataflow and the portable runners start it.
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
ENTRYPOINT ["/opt/apache/beam/boot"]
