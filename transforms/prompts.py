"""Stage *prompts*: N scene prompts per cluster across skills, each with a ``{subject}`` placeholder.

The synthesis stage renders these prompts with a DreamBooth of the cluster to make training targets, so
they must cover the skills of the taxonomy -- stylization, recontextualization, novel view, property
change (colour, material), accessorization and emotion/action (the last for living subjects only) -- in
the configured mix (``prompts.mix``), and every one must be usable
(:func:`transforms.scene_templates.check_prompts`).

Backends (``prompts.backend``):

* ``vllm``: a text model (default ``Qwen/Qwen2.5-7B-Instruct``) writes them as JSON under a schema; the
  answer is checked as above and asked for again with the problems fed back; then ``prompts_failed``
  (reject the cluster) or the templates (``prompts`` in ``provenance.fallbacks``).
* ``templates``: :func:`transforms.scene_templates.template_prompts`, a grammar of templates and broad
  vocabularies per skill, deterministic per cluster.
"""
from __future__ import annotations

import json
import random
import string
from collections.abc import Mapping
from typing import Any

from schemas.records import Cluster, ClusterProvenance, Prompt
from transforms.common import Reason
from transforms.models.llm_client import (
    ChatClient,
    ChatResponse,
    OutputInvalid,
    json_schema_params,
    parse_json_object,
)
from transforms.models.model_stage import ClusterModelHandler, ModelStage, ResolveFn
from transforms.prompt_files import PromptText
from transforms.scene_templates import (
    SKILL_DESCRIPTIONS,
    check_prompts,
    cluster_seed,
    load_grammar,
    skill_counts,
    template_prompts,
)
from transforms.settings import LLMConfig, PromptsConfig

STAGE = "prompts"

PROMPTS_FAILED = "prompts_failed"

REASONS = (Reason(PROMPTS_FAILED, whole_cluster=True),)


# --- the LLM backend ----------------------------------------------------------------------------------------------

def prompts_schema(counts: Mapping[str, int], config: PromptsConfig) -> dict[str, Any]:
    n = sum(counts.values())
    return {
        "type": "object",
        "properties": {"prompts": {
            "type": "array", "minItems": n, "maxItems": n,
            "items": {"type": "object",
                      "properties": {"prompt": {"type": "string", "minLength": config.min_chars,
                                                "maxLength": config.max_chars},
                                     "skill": {"type": "string", "enum": sorted(counts)}},
                      "required": ["prompt", "skill"], "additionalProperties": False}}},
        "required": ["prompts"],
        "additionalProperties": False,
    }


def validate_prompts(response: ChatResponse, counts: Mapping[str, int], is_live: bool,
                     config: PromptsConfig) -> tuple[Prompt, ...]:
    data = parse_json_object(response)
    items = data.get("prompts")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise OutputInvalid('expected {"prompts": [{"prompt": ..., "skill": ...}, ...]}')
    prompts = tuple(Prompt(" ".join(str(i.get("prompt", "")).split()), str(i.get("skill", ""))) for i in items)
    problems = check_prompts(prompts, counts, is_live, min_chars=config.min_chars, max_chars=config.max_chars,
                             max_similarity=config.max_similarity, accessorize_objects=config.accessorize_objects)
    if problems:
        raise OutputInvalid("; ".join(problems[:8]))
    return prompts


def prompts_messages(prompt: PromptText, cluster: Cluster, counts: Mapping[str, int],
                     config: PromptsConfig) -> list[dict[str, Any]]:
    instructions = string.Template(prompt.text).safe_substitute(
        n=sum(counts.values()), min_chars=config.min_chars, max_chars=config.max_chars)
    request = {"subject": cluster.subject, "class_noun": cluster.class_noun, "is_live": bool(cluster.is_live),
               "counts": dict(counts), "skills": {s: SKILL_DESCRIPTIONS[s] for s in counts}}
    return [{"role": "system", "content": instructions},
            {"role": "user", "content": json.dumps(request, ensure_ascii=False)}]


def cluster_counts(cluster: Cluster, config: PromptsConfig) -> dict[str, int]:
    """The skill counts the model is asked for: the same as :func:`template_prompts` gives the cluster."""
    rng = random.Random(cluster_seed(cluster.cluster_id))
    return skill_counts(config.n, config.mix, bool(cluster.is_live), rng, config.accessorize_objects)


def cluster_template_prompts(cluster: Cluster, config: PromptsConfig) -> tuple[Prompt, ...]:
    return template_prompts(cluster.cluster_id, cluster.class_noun, bool(cluster.is_live), config.n, config.mix,
                            accessorize_objects=config.accessorize_objects, max_similarity=config.max_similarity,
                            min_chars=config.min_chars, max_chars=config.max_chars)


class PromptsHandler(ClusterModelHandler):
    """RunInference handler: ``Cluster`` -> ``Outcome(value=prompts)``."""

    stage = STAGE
    _config: PromptsConfig

    def offline(self, cluster: Cluster) -> tuple[Prompt, ...]:
        return cluster_template_prompts(cluster, self._config)

    def ask(self, client: ChatClient, cluster: Cluster) -> tuple[Prompt, ...]:
        config, prompt = self._config, self._prompt
        assert prompt is not None
        counts = cluster_counts(cluster, config)
        is_live = bool(cluster.is_live)
        return client.chat_validated(
            config.model, prompts_messages(prompt, cluster, counts, config),
            lambda response: validate_prompts(response, counts, is_live, config), self._llm.validation_retries,
            max_tokens=config.max_tokens, temperature=config.temperature, seed=cluster_seed(cluster.cluster_id),
            **json_schema_params(prompts_schema(counts, config), "scene_prompts", config.structured_output))


class ApplyPromptsFn(ResolveFn):
    """Prompts into the cluster; on failure the templates' or a reject."""

    offline_backend = "templates"
    _config: PromptsConfig

    def __init__(self, config: PromptsConfig, prompt_tag: str | None) -> None:
        super().__init__(STAGE, PROMPTS_FAILED, config, prompt_tag)

    def offline(self, cluster: Cluster) -> tuple[Prompt, ...]:
        return cluster_template_prompts(cluster, self._config)

    def offline_prompt_tag(self) -> str:
        return load_grammar()[1]  # the template grammar's name@hash

    def with_value(self, cluster: Cluster, prompts: tuple[Prompt, ...], provenance: ClusterProvenance) -> Cluster:
        return cluster.replace(prompts=prompts, provenance=provenance)


class ScenePrompts(ModelStage):
    """``Cluster``s -> ``Cluster``s with ``prompts`` (+ ``prompts_failed`` rejects)."""

    def __init__(self, config: PromptsConfig, llm: LLMConfig) -> None:
        handler = PromptsHandler(config, llm)
        super().__init__(STAGE, handler, ApplyPromptsFn(config, handler.prompt_tag))
