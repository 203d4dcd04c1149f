# syntax=docker/dockerfile:1
#
# Worker image for the GPU phase (synthesize) on Dataflow (custom container) and on Flink/Spark through
# Beam's portable runners; README.md "GPU workers" has the build and launch commands.
#
#   docker build -t icl-worker .                                   # Beam SDK + CUDA PyTorch + the project
#   docker build --build-arg MODEL_ID=stable-diffusion-v1-5/stable-diffusion-v1-5 -t icl-worker .
#                                                                  # ... with the base model's weights baked in
#
# One Beam version everywhere: BEAM_VERSION must equal BEAM_VERSION in setup.py (tests/test_packaging.py
# checks it). A launcher and workers on different Beam or Python versions fail in odd ways, so launch
# from this image too (README.md).
ARG BEAM_VERSION=2.77.0

# The Beam SDK image of that version: its Python (3.11) and its worker boot (/opt/apache/beam/boot, the entry
# point Dataflow and the portable runners start). PyPI's torch wheels for Linux are CUDA builds that carry
# their CUDA libraries (nvidia-* wheels), so the image needs no CUDA base: only the NVIDIA driver of the host,
# which Dataflow installs (install-nvidia-driver in the accelerator hint) and a GPU node provides.
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}
ARG BEAM_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/opt/huggingface

WORKDIR /opt/icl-cluster-pipeline
COPY . .

# One layer: the project with its model and GCP extras, every package pinned by constraints.txt (the torch,
# torchvision and CUDA libraries the tests run with), Beam left at the SDK image's version; then a conflict check.
RUN pip install --no-cache-dir -c constraints.txt ".[models,gcp]" \
    && python -c "import apache_beam; v = apache_beam.__version__; assert v == '${BEAM_VERSION}', v" \
    && pip check

# Optional: bake the base model into the image, so hundreds of workers do not each download ~4 GB from
# the Hub at start-up (then run with HF_HUB_OFFLINE=1).
ARG MODEL_ID=""
RUN if [ -n "${MODEL_ID}" ]; then \
        python -c "from diffusers import DiffusionPipeline; DiffusionPipeline.download('${MODEL_ID}')"; \
    fi

# The entry point stays the SDK image's Beam boot; stated here so that it is plain to see.
ENTRYPOINT ["/opt/apache/beam/boot"]
