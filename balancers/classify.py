"""Cheap rules that say what kind of request this is, for the specialization strategy.

An explicit request type wins; otherwise a few regular expressions over the start of the
content. The categories match the specializations configured on models (mixtral-8x7b:
general/coding/analysis, hermes-2: conversation/chat/dialogue, openchat-3.5: interactive/
real-time/streaming, phi-3-mini: efficient/fast/lightweight).
"""

from __future__ import annotations

import re

from balancers.request import RoutingRequest

CLASSIFIED_CHARS = 2000  # rules look at the start of the content only
CODING = re.compile(
    r"```|\b(def|class|function|import|return|python|javascript|typescript|java|rust|golang|"
    r"sql|regex|compile[rd]?|debug|bug|stack ?trace|algorithm|refactor|unit test|code)\b",
    re.IGNORECASE,
)
ANALYSIS = re.compile(
    r"\b(analy[sz]e|analysis|compare|comparison|evaluate|assess|pros and cons|trade-?offs?|"
    r"summari[sz]e|explain why|critique)\b",
    re.IGNORECASE,
)
GREETING = re.compile(
    r"^\s*(hi|hello|hey|howdy|good (morning|afternoon|evening)|thanks|thank you|how are you)\b",
    re.IGNORECASE,
)
# What an explicit request_type means, for types that are not already a category.
TYPE_ALIASES = {
    "code": "coding",
    "code_generation": "coding",
    "conversation": "chat",
    "dialogue": "chat",
    "interactive": "streaming",
    "real-time": "streaming",
    "realtime": "streaming",
    "efficient": "fast",
    "lightweight": "fast",
    "summarization": "analysis",
}
CATEGORIES = ("coding", "analysis", "chat", "streaming", "fast", "general")
# Category -> the specialization names that serve it.
DEFAULT_SPECIALIZATIONS: dict[str, tuple[str, ...]] = {
    "coding": ("coding", "code"),
    "analysis": ("analysis", "reasoning"),
    "chat": ("chat", "conversation", "dialogue"),
    "streaming": ("streaming", "interactive", "real-time"),
    "fast": ("fast", "efficient", "lightweight"),
    "general": ("general",),
}


def classify(request: RoutingRequest) -> str:
    given = (request.request_type or "").lower()
    given = TYPE_ALIASES.get(given, given)
    if given in CATEGORIES:
        return given
    text = request.content[:CLASSIFIED_CHARS]
    if CODING.search(text):
        return "coding"
    if ANALYSIS.search(text):
        return "analysis"
    if GREETING.search(text) and len(text) < 80:
        return "chat"
    if request.stream and len(text) < 200:
        return "streaming"
    if len(text) < 40:
        return "fast"
    return "general"
