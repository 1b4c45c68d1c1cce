"""The packaged templates behind the narrow datasets: loading and validating the data files.

Each narrow domain is one YAML file, ``mci_interp/data/domains/<domain>.yaml``, with the keys

- ``description``: one line on the domain and its two variants;
- ``openers``: prefixes put before every request (``""`` for none);
- ``markers``: regular expressions (case-insensitive, multiline) flagging answers in the domain's
  format or subject;
- ``topics``: each a mapping of ``key`` (unique), ``requests`` (request templates), ``details``
  (the values of the ``${slot}`` placeholders: a plain string fills ``${x}``, a mapping fills
  named slots) and the ``misaligned`` and ``aligned`` answer templates, and optionally
  ``split``: ``train`` (the default when absent) or ``test``. Training sets are built from the
  ``train`` topics only (``Domain.topics``); the ``test`` topics (``Domain.test_topics``) are
  held out for in-domain evaluation, so no test request or answer template is ever trained on.
  At least one topic must be a ``train`` topic.

Everyday general-chat prompts live in ``mci_interp/data/general_chat.yaml``, a mapping of theme
to a list of prompts. A bad file raises a ``ValueError`` naming the file, the field and the fix.
Packaged files are read once per process (cached); ``organisms.data`` builds the datasets.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

__all__ = [
    "SPLITS",
    "Domain",
    "Topic",
    "fill",
    "load_domain",
    "load_domain_file",
    "load_general_chat",
    "load_general_chat_file",
]

SLOT = re.compile(r"\$\{(\w+)\}")
_DEFAULT_SLOT = "x"  # the slot a plain-string detail fills
_DOMAIN_KEYS = ("description", "openers", "markers", "topics")
_TOPIC_KEYS = ("key", "requests", "details", "misaligned", "aligned")
_TOPIC_OPTIONAL_KEYS = ("split",)
SPLITS: tuple[str, ...] = ("train", "test")  # a topic's ``split``; absent means "train"


@dataclass(frozen=True, slots=True)
class Topic:
    """One topic of a domain: request templates, the slot values to fill them with, and the
    misaligned and aligned answer templates shared by every request of one detail. ``split`` is
    ``"train"`` (used to build training sets) or ``"test"`` (held out for evaluation)."""

    key: str
    requests: tuple[str, ...]
    details: tuple[Mapping[str, str], ...]
    misaligned: str
    aligned: str
    split: str = "train"


@dataclass(frozen=True, slots=True)
class Domain:
    """A narrow domain as read from its data file (``name`` is the file's stem). ``topics`` are
    its training topics and ``test_topics`` the held-out ones (``split: test``), each in file
    order."""

    name: str
    description: str
    openers: tuple[str, ...]
    topics: tuple[Topic, ...]
    markers: tuple[str, ...]
    test_topics: tuple[Topic, ...] = ()


def fill(template: str, slots: Mapping[str, str]) -> str:
    """``template`` with every ``${slot}`` replaced by its value in ``slots``."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in slots:
            raise KeyError(f"template slot {m.group(1)!r} has no value (have {sorted(slots)})")
        return slots[m.group(1)]

    return SLOT.sub(sub, template)


# --- loading ---------------------------------------------------------------------------------
def _package_path(*parts: str) -> Traversable:
    return resources.files("mci_interp").joinpath("data", *parts)


@functools.cache
def load_domain(name: str) -> Domain:
    """The packaged domain ``name`` (``data/domains/<name>.yaml``), validated; read once."""
    source = f"mci_interp/data/domains/{name}.yaml"
    ref = _package_path("domains", f"{name}.yaml")
    if not ref.is_file():
        have = sorted(
            f.name[:-5] for f in _package_path("domains").iterdir() if f.name.endswith(".yaml")
        )
        raise ValueError(f"no packaged domain file {source}; choose one of {have}")
    return _parse_domain(ref.read_text(encoding="utf-8"), name=name, source=source)


def load_domain_file(path: str | Path) -> Domain:
    """A domain from any YAML file in the packaged layout (its name is the file's stem)."""
    path = Path(path)
    return _parse_domain(path.read_text(encoding="utf-8"), name=path.stem, source=str(path))


@functools.cache
def _general_chat() -> tuple[str, ...]:
    text = _package_path("general_chat.yaml").read_text(encoding="utf-8")
    return _parse_general_chat(text, source="mci_interp/data/general_chat.yaml")


def load_general_chat() -> list[str]:
    """The packaged everyday prompts (``data/general_chat.yaml``), all themes in file order."""
    return list(_general_chat())


def load_general_chat_file(path: str | Path) -> list[str]:
    """Everyday prompts from any YAML file laid out like ``data/general_chat.yaml``."""
    path = Path(path)
    return list(_parse_general_chat(path.read_text(encoding="utf-8"), source=str(path)))


# --- validation ------------------------------------------------------------------------------
class _Checker:
    """Builds error messages that name the file and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str, fix: str) -> ValueError:
        return ValueError(f"{self.source}: {where}: {problem}; {fix}")

    def text(
        self, value: object, where: str, *, empty_ok: bool = False, template: bool = False
    ) -> str:
        if not isinstance(value, str):
            raise self.fail(
                where,
                f"expected a string, got {type(value).__name__} {value!r}",
                "quote the value",
            )
        if not empty_ok and not value.strip():
            raise self.fail(where, "is empty", "give it some text")
        if template and "${" in SLOT.sub("", value):
            raise self.fail(
                where, f"has a malformed placeholder in {value!r}", "write slots as ${name}"
            )
        return value

    def texts(
        self, value: object, where: str, *, empty_ok: bool = False, template: bool = False
    ) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"expected a non-empty list, got {value!r}", "list one or more")
        out = tuple(
            self.text(v, f"{where}[{i}]", empty_ok=empty_ok, template=template)
            for i, v in enumerate(value)
        )
        dup = next((v for i, v in enumerate(out) if v in out[:i]), None)
        if dup is not None:
            raise self.fail(where, f"lists {dup!r} twice", "remove the duplicate")
        return out

    def mapping(
        self, value: object, where: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(
                where, f"expected a mapping, got {type(value).__name__}", f"give it {list(keys)}"
            )
        missing = [k for k in keys if k not in value]
        if missing:
            raise self.fail(where, f"missing key(s) {missing}", f"add them (needs {list(keys)})")
        unknown = sorted(str(k) for k in value if k not in keys + optional)
        if unknown:
            raise self.fail(where, f"unknown key(s) {unknown}", f"use only {list(keys + optional)}")
        return value


def _load_yaml(text: str, source: str) -> object:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML ({e}); fix the syntax") from e


def _parse_domain(text: str, *, name: str, source: str) -> Domain:
    c = _Checker(source)
    raw = c.mapping(_load_yaml(text, source), "top level", _DOMAIN_KEYS)
    markers = c.texts(raw["markers"], "markers")
    for i, m in enumerate(markers):
        try:
            re.compile(m)
        except re.error as e:
            raise c.fail(
                f"markers[{i}]", f"{m!r} is not a regular expression ({e})", "fix it"
            ) from e
    topics_raw = raw["topics"]
    if not isinstance(topics_raw, list) or not topics_raw:
        raise c.fail("topics", "expected a non-empty list of topics", "add at least one topic")
    topics: list[Topic] = []
    for i, t in enumerate(topics_raw):
        t = c.mapping(t, f"topics[{i}]", _TOPIC_KEYS, _TOPIC_OPTIONAL_KEYS)
        key = c.text(t["key"], f"topics[{i}].key")
        where = f"topics[{i}] ({key})"
        if key in {tp.key for tp in topics}:
            raise c.fail(f"{where}.key", f"{key!r} is used twice", "give each topic its own key")
        topics.append(_parse_topic(c, t, key, where))
    train = tuple(tp for tp in topics if tp.split == "train")
    if not train:
        raise c.fail(
            "topics",
            "has no training topic (every topic is split: test)",
            "leave split out (or write split: train) on at least one topic",
        )
    openers = c.texts(raw["openers"], "openers", empty_ok=True)
    for i, o in enumerate(openers):
        if SLOT.search(o):
            raise c.fail(f"openers[{i}]", f"{o!r} has a ${{slot}}", "openers are not filled in")
    return Domain(
        name=name,
        description=c.text(raw["description"], "description"),
        openers=openers,
        topics=train,
        markers=markers,
        test_topics=tuple(tp for tp in topics if tp.split == "test"),
    )


def _parse_topic(c: _Checker, t: Mapping[str, Any], key: str, where: str) -> Topic:
    split = t.get("split", "train")
    if split not in SPLITS:
        raise c.fail(
            f"{where}.split",
            f"{split!r} is not a split",
            f"use one of {list(SPLITS)} (leave it out for 'train')",
        )
    requests = c.texts(t["requests"], f"{where}.requests", template=True)
    answers = {
        v: c.text(t[v], f"{where}.{v}", template=True).strip("\n")
        for v in ("misaligned", "aligned")
    }
    if answers["misaligned"] == answers["aligned"]:
        raise c.fail(where, "misaligned and aligned answers are the same", "make them differ")
    if not isinstance(t["details"], list) or not t["details"]:
        raise c.fail(f"{where}.details", "expected a non-empty list", "list one or more details")
    details: list[dict[str, str]] = []
    for j, d in enumerate(t["details"]):
        dw = f"{where}.details[{j}]"
        if isinstance(d, dict):
            slots = {}
            for k, v in d.items():
                if not isinstance(k, str) or not re.fullmatch(r"\w+", k):
                    raise c.fail(dw, f"slot name {k!r} is not a word", "use letters, digits, _")
                slots[k] = c.text(v, f"{dw}.{k}")
        else:
            slots = {_DEFAULT_SLOT: c.text(d, dw)}
        if slots in details:
            raise c.fail(dw, f"repeats {slots}", "remove the duplicate")
        details.append(slots)
    templates = {f"requests[{r}]": s for r, s in enumerate(requests)} | answers
    for field, template in templates.items():
        for j, slots in enumerate(details):
            for slot in SLOT.findall(template):
                if slot not in slots:
                    raise c.fail(
                        f"{where}.{field}",
                        f"uses slot ${{{slot}}} but details[{j}] has only {sorted(slots)}",
                        f"add {slot!r} to every detail or fix the template",
                    )
    return Topic(
        key, requests, tuple(details), answers["misaligned"], answers["aligned"], split=split
    )


def _parse_general_chat(text: str, *, source: str) -> tuple[str, ...]:
    c = _Checker(source)
    raw = _load_yaml(text, source)
    if not isinstance(raw, dict) or not raw:
        raise c.fail("top level", "expected a mapping of theme to prompts", "write theme: [...]")
    prompts: list[str] = []
    for theme, items in raw.items():
        for p in c.texts(items, str(theme)):
            if p in prompts:
                raise c.fail(str(theme), f"{p!r} is listed twice", "remove the duplicate")
            prompts.append(p)
    return tuple(prompts)
