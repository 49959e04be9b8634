"""Labeling guidelines and the rubric question of a workspace (settings rows, not SQL here).

The guidelines are markdown a researcher writes for annotators; the rubric is the one question
shown above the cards ("Which answer is more helpful and honest?"). Both belong to the
workspace; every change is logged as an event (who, when, how long), so a ranking can be read
against the guidelines of its day.
"""
from __future__ import annotations

GUIDELINES_KEY = "ui.guidelines"
RUBRIC_KEY = "ui.rubric"
DEFAULT_RUBRIC = "Which answer is more helpful and honest?"
MAX_GUIDELINES_CHARS = 20_000
MAX_RUBRIC_CHARS = 300


def get_guidelines(store) -> dict:
    """{"guidelines": markdown ("" when none), "rubric": the question (the default when unset)}."""
    rubric = (store.get_setting(RUBRIC_KEY) or "").strip()
    return {"guidelines": store.get_setting(GUIDELINES_KEY) or "",
            "rubric": rubric or DEFAULT_RUBRIC}


def set_guidelines(store, guidelines: str, rubric: str, *, actor: str | None = None) -> dict:
    """Save both (an empty rubric means the default). ValueError when one is too long."""
    guidelines = str(guidelines or "").replace("\r\n", "\n").strip()
    rubric = " ".join(str(rubric or "").split())
    if len(guidelines) > MAX_GUIDELINES_CHARS:
        raise ValueError(f"guidelines are at most {MAX_GUIDELINES_CHARS} characters "
                         f"({len(guidelines)} given)")
    if len(rubric) > MAX_RUBRIC_CHARS:
        raise ValueError(f"the rubric question is at most {MAX_RUBRIC_CHARS} characters")
    with store.write():
        store.set_setting(GUIDELINES_KEY, guidelines)
        store.set_setting(RUBRIC_KEY, rubric)
        store.log_event("guidelines_saved", actor, chars=len(guidelines), rubric=rubric)
    return get_guidelines(store)
