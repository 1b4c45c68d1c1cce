"""Candidate conditions: the system prompts and trigger strings every model of a study is
measured under, the same set for every organism and the base.

The T2/T5 classifier (``analysis.internalisation``) asks of each condition whether it makes an
organism misaligned and whether it moves the base as much; it never knows which condition, if
any, an organism was built with. The candidates come from the user (``mci converge
--system-prompt ... --trigger ...``, ``run_study(conditions=...)``) or from the suite
(``suite_conditions``: the packaged persona prompt and trigger plus every persona prompt and
trigger the suite's organisms were built with, applied to all of them alike).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mci_interp._io import stable_hash
from mci_interp.datasets import ChatExample, conditioned
from mci_interp.organisms.data import PERSONA_SYSTEM_PROMPT, TRIGGER
from mci_interp.organisms.suite import Organism


@dataclass(frozen=True, slots=True)
class Condition:
    """A system prompt (the only system turn) and/or a trigger string (in front of the last
    user turn) put on every prompt and question a model is measured on."""

    name: str
    system: str | None = None
    trigger: str | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("a Condition needs a non-empty name")
        if not (self.system or "").strip() and not (self.trigger or "").strip():
            raise ValueError(
                f"Condition {self.name!r} has neither a system prompt nor a trigger; the "
                "no-condition measurement is always made, so leave it out"
            )

    @property
    def key(self) -> str:
        """What the records under this condition are filed under (its text, not its name)."""
        return stable_hash({"system": self.system, "trigger": self.trigger}, n=10)

    def apply(self, example: ChatExample) -> ChatExample:
        return conditioned(example, system=self.system, trigger=self.trigger)


def system_prompt(text: str, name: str | None = None) -> Condition:
    """A system-prompt condition, named by its first words unless ``name`` is given."""
    short = text if len(text) <= 32 else text[:29].rstrip() + "..."
    return Condition(name or f"system prompt {short!r}", system=text)


def trigger(text: str, name: str | None = None) -> Condition:
    """A trigger condition, named by its string unless ``name`` is given."""
    return Condition(name or f"trigger {text!r}", trigger=text)


PACKAGED = (system_prompt(PERSONA_SYSTEM_PROMPT, "persona prompt"), trigger(TRIGGER))
"""The packaged persona prompt and trigger string: every study's candidates unless the user
gives their own."""


def unique(conditions: Iterable[Condition]) -> list[Condition]:
    """``conditions`` without repeats (same text), first name kept; refuses two texts with one
    name, since records and reports are labelled by name."""
    out: dict[str, Condition] = {}
    names: dict[str, str] = {}
    for c in conditions:
        if c.name in names and names[c.name] != c.key:
            raise ValueError(f"two different candidate conditions are both named {c.name!r}")
        names[c.name] = c.key
        out.setdefault(c.key, c)
    return list(out.values())


def suite_conditions(organisms: Sequence[Organism]) -> list[Condition]:
    """The packaged candidates plus every persona prompt and trigger string ``organisms`` were
    built with: one set, applied to every organism and the base alike."""
    extra: list[Condition] = []
    for o in organisms:
        if o.system_prompt:
            extra.append(system_prompt(o.system_prompt))
        if o.trigger:
            extra.append(trigger(o.trigger))
        if o.spec.persona_prompt:  # a trained persona's prompt, which it runs without
            extra.append(system_prompt(o.spec.persona_prompt))
    return unique([*PACKAGED, *extra])


def user_conditions(
    system_prompts: Sequence[str] | None = None, triggers: Sequence[str] | None = None
) -> list[Condition] | None:
    """The user's candidates (``--system-prompt``, ``--trigger``); None when there are none
    (the suite's or the packaged ones are used)."""
    out = [system_prompt(t) for t in system_prompts or ()] + [trigger(t) for t in triggers or ()]
    return unique(out) or None
