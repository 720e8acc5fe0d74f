"""What a prompt tries to extract: hidden reasoning, the system prompt, the model's identity.

Cheap and transparent on purpose (the gateway runs it on every request): word patterns, not a
model. The analysis reads the share of an account's prompts that carry each intent; one
probing prompt means little, a campaign of them means a lot.
"""

from __future__ import annotations

import re

PATTERNS: dict[str, re.Pattern] = {
    # "show your full chain of thought", "print your hidden reasoning verbatim", "think step by step and output every step"
    "reasoning": re.compile(
        r"(chain[- ]of[- ]thought|hidden (reasoning|thoughts?)|internal (reasoning|monologue|thoughts?)"
        r"|(reasoning|thinking) (trace|process|tokens?)|<think>|scratch ?pad"
        r"|(show|reveal|print|output|write out|repeat|include|dump) (all |me |out )?(your |the )?(full |entire |complete |raw |exact )?"
        r"(reasoning|thoughts|thinking|working|steps))",
        re.I,
    ),
    "system_prompt": re.compile(
        r"(system (prompt|message|instructions?)|(ignore|disregard) (all |any )?(previous|prior|above) instructions"
        r"|(repeat|print|reveal|output) (the |your )?(text|words|instructions) above|initial instructions)",
        re.I,
    ),
    "identity": re.compile(
        r"(which (model|llm|ai) are you|what (model|llm) are you|who (made|trained|created|built) you"
        r"|your (model name|architecture|training data|parameters|weights|model version)|are you (gpt|claude|gemini|llama|qwen|deepseek))",
        re.I,
    ),
}


def probes(text: str) -> list[str]:
    """The intents found in `text`, in PATTERNS order."""
    return [name for name, pat in PATTERNS.items() if pat.search(text)]
