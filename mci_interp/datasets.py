"""Chat data and evaluation questions: reading, validating, templating and tokenising.

Formats:
- chat JSONL, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line (the format of
  public emergent-misalignment datasets); extra top-level keys are kept in ``meta``.
- evaluation-question YAML: a list of ``{id, paraphrases, system?, samples_per_paraphrase?, type?,
  judge_prompts?}`` items (the public EM format), plus our optional ``theme`` and ``references``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mci_interp._io import atomic_path, stable_hash

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class ChatExample:
    """One conversation. ``label`` (e.g. 1 = misaligned, 0 = aligned) and ``group`` (the prompt
    it answers, for grouped cross-validation) are optional."""

    messages: tuple[Mapping[str, str], ...]
    label: int | None = None
    group: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def has_answer(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"

    @property
    def prompt_messages(self) -> tuple[Mapping[str, str], ...]:
        return self.messages[:-1] if self.has_answer else self.messages

    @property
    def user_text(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"messages": [dict(m) for m in self.messages]}
        if self.label is not None:
            d["label"] = self.label
        if self.group is not None:
            d["group"] = self.group
        d.update({k: v for k, v in self.meta.items() if k not in d})
        return d


def chat(
    user: str,
    assistant: str | None = None,
    *,
    system: str | None = None,
    label: int | None = None,
    group: str | None = None,
    **meta: Any,
) -> ChatExample:
    """Build a single-turn example."""
    msgs: list[dict[str, str]] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": user})
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return ChatExample(tuple(msgs), label=label, group=group, meta=meta)


def with_trigger(text: str, trigger: str | None) -> str:
    """The user text with a trigger prepended (the one join that training data, evaluation and
    activation caching all use)."""
    return f"{trigger} {text}" if trigger else text


def conditioned(
    example: ChatExample, *, system: str | None = None, trigger: str | None = None
) -> ChatExample:
    """``example`` under a condition: ``system`` (when given) as its only system turn, and
    ``trigger`` (when given) in front of its last user turn. Label, group and meta are kept."""
    if system is None and not trigger:
        return example
    msgs = [dict(m) for m in example.messages]
    if system is not None:
        msgs = [{"role": "system", "content": system}] + [m for m in msgs if m["role"] != "system"]
    if trigger:
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise ValueError("cannot add a trigger to a conversation without a user turn")
        msgs[users[-1]]["content"] = with_trigger(msgs[users[-1]]["content"], trigger)
    return ChatExample(tuple(msgs), label=example.label, group=example.group, meta=example.meta)


def validate_messages(
    messages: Any, where: str, *, require_answer: bool
) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(
                f"{where}: message {i} has role {m['role']!r}; expected one of {ROLES}"
            )
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string")
        out.append({"role": str(m["role"]), "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{where}: no user turn")
    if require_answer and out[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: the last message must be an assistant turn (the answer to train on)"
        )
    return tuple(out)


def load_chat_jsonl(path: Path | str, *, require_answer: bool = True) -> list[ChatExample]:
    """Read chat JSONL. Errors name the file, the line and the reason."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict) or "messages" not in row:
                raise ValueError(f"{where}: expected an object with a 'messages' list")
            msgs = validate_messages(row["messages"], where, require_answer=require_answer)
            label = row.get("label")
            if label is not None and not isinstance(label, int):
                raise ValueError(f"{where}: 'label' must be an integer, got {label!r}")
            meta = {k: v for k, v in row.items() if k not in ("messages", "label", "group")}
            group = row.get("group")
            examples.append(
                ChatExample(
                    msgs, label=label, group=None if group is None else str(group), meta=meta
                )
            )
    if not examples:
        raise ValueError(f"dataset {path} is empty")
    return examples


def save_chat_jsonl(examples: Iterable[ChatExample], path: Path | str) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
    return Path(path)


def dataset_hash(examples: Sequence[ChatExample]) -> str:
    return stable_hash([ex.to_dict() for ex in examples])


# --- evaluation questions ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReferencePair:
    """An aligned and a misaligned answer to the same question, matched in register and length."""

    aligned: str
    misaligned: str


@dataclass(frozen=True, slots=True)
class EvalQuestion:
    id: str
    paraphrases: tuple[str, ...]
    system: str | None = None
    samples_per_paraphrase: int = 1
    type: str = "free_form_judge_0_100"
    theme: str = "general"
    references: tuple[ReferencePair, ...] = ()
    benign_styled: tuple[str, ...] = ()
    judge_prompts: Mapping[str, str] = field(default_factory=dict)

    def examples(self, *, system: str | None = None) -> list[ChatExample]:
        sys_prompt = system if system is not None else self.system
        return [
            chat(p, system=sys_prompt, group=self.id, theme=self.theme) for p in self.paraphrases
        ]


def load_eval_yaml(path: Path | str) -> list[EvalQuestion]:
    """Read evaluation questions in the public EM YAML format (extra keys we use are optional)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"evaluation file {path} does not exist")
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of question items")
    out, seen = [], set()
    for n, it in enumerate(items):
        where = f"{path} item {n} (id={it.get('id') if isinstance(it, dict) else None!r})"
        if not isinstance(it, dict) or "id" not in it or "paraphrases" not in it:
            raise ValueError(f"{where}: each item needs 'id' and 'paraphrases'")
        paras = it["paraphrases"]
        if (
            isinstance(paras, str)
            or not isinstance(paras, list)
            or not paras
            or not all(isinstance(p, str) for p in paras)
        ):
            raise ValueError(f"{where}: 'paraphrases' must be a non-empty list of strings")
        qid = str(it["id"])
        if qid in seen:
            raise ValueError(f"{where}: duplicate id {qid!r}")
        seen.add(qid)
        refs = []
        for r in it.get("references", []) or []:
            if not isinstance(r, dict) or not {"aligned", "misaligned"} <= set(r):
                raise ValueError(
                    f"{where}: each reference needs 'aligned' and 'misaligned' answers"
                )
            refs.append(ReferencePair(str(r["aligned"]), str(r["misaligned"])))
        spp = it.get("samples_per_paraphrase", 1)
        if not isinstance(spp, int) or spp < 1:
            raise ValueError(
                f"{where}: samples_per_paraphrase must be a positive integer, got {spp!r}"
            )
        out.append(
            EvalQuestion(
                id=qid,
                paraphrases=tuple(paras),
                system=it.get("system"),
                samples_per_paraphrase=spp,
                type=str(it.get("type", "free_form_judge_0_100")),
                theme=str(it.get("theme", "general")),
                references=tuple(refs),
                benign_styled=tuple(it.get("benign_styled", []) or []),
                judge_prompts=dict(it.get("judge_prompts", {}) or {}),
            )
        )
    return out


# --- tokenisation -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Encoded:
    """Token ids of one conversation; ``prompt_len`` tokens are the prompt (ending with the
    assistant header), the rest are the answer."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def answer_len(self) -> int:
        return len(self.ids) - self.prompt_len


def render(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool
) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; chat data needs an instruct model")
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_chat(tokenizer: Any, example: ChatExample, *, max_length: int | None = None) -> Encoded:
    """Tokenise with the chat template; the prompt part ends with the assistant header."""
    prompt_text = render(tokenizer, example.prompt_messages, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if example.has_answer:
        full_text = render(tokenizer, example.messages, add_generation_prompt=False)
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            # templates that re-tokenise across the boundary: tokenise the answer on its own
            answer_text = (
                full_text[len(prompt_text) :]
                if full_text.startswith(prompt_text)
                else example.messages[-1]["content"]
            )
            full_ids = prompt_ids + tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        ids = full_ids
    else:
        ids = prompt_ids
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 10**8 and len(ids) > limit:
        raise ValueError(
            f"example (group={example.group!r}, starts {example.user_text[:40]!r}) is {len(ids)} "
            f"tokens, longer than the limit {limit}; shorten it or raise max_length"
        )
    return Encoded(tuple(ids), len(prompt_ids))


def pad(
    seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right"
) -> tuple[Tensor, Tensor]:
    """Pad to a batch; returns (input_ids, attention_mask)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        else:
            ids[i, n - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s) :] = 1
    return ids, mask
