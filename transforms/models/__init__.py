"""Model boundaries the stages share: how each model is loaded, batched and called.

* :mod:`transforms.models.clip` -- open_clip (CLIP image and text embeddings) through Beam ``RunInference``;
* :mod:`transforms.models.llm_client` -- an OpenAI-compatible chat client (vLLM's API) with deadlines and retries;
* :mod:`transforms.models.vllm_server` -- a vLLM server a worker starts for itself;
* :mod:`transforms.models.model_stage` -- the ``RunInference`` shape the caption, subject and prompts stages share;
* :mod:`transforms.models.diffusion` -- the diffusers base model and ``dreambooth_synth`` synthesizer of phase 2.

This package imports none of them: each stage imports the one it uses, so reading this list loads no model
library.
"""
