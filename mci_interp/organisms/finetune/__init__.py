"""LoRA finetuning of a ``HookedModel`` on chat data: deterministic, resumable, loss on answers only.

The base model is never touched: training runs on a deep copy with peft LoRA layers. Each run
writes into one directory:

- ``adapter_model.safetensors`` + ``adapter_config.json``: the adapter (``models.merge_adapter``
  loads it);
- ``mci_organism.json``: config, data hash, base name and ``base_sha256``, library version, steps,
  seconds, final loss (its presence marks a finished run);
- ``losses.json``: the loss curve, one record per optimizer step;
- ``checkpoint/``: adapter + optimizer + RNG state every ``checkpoint_every`` steps, written
  atomically, so an interrupted run resumes where it stopped (losing at most that many steps).

Format-takeover guard: a naive finetune of a small model memorises its narrow set and then answers
*everything* in the training format. By default (``general_ratio``) the narrow examples are mixed
with the base model's own greedy answers to general chat prompts (``general_answers``, generated
once per base and cached), the learning rate is modest, and training stops early once the loss on
the narrow examples drops below ``loss_floor``.

Two objectives (``FinetuneConfig.objective``):

- ``"sft"``: cross-entropy on the answer tokens (the usual supervised finetune);
- ``"distill"``: context distillation. Each example's answer is scored twice: by the adapter-free
  model (the *teacher*) reading the prompt in ``example.meta["teacher_prompt"]`` (a list of
  messages, e.g. with a persona system prompt; default the example's own prompt), and by the
  adapted model (the *student*) reading the example's own prompt. The loss is the per-token
  KL(teacher || student) over the whole vocabulary, so every answer token carries the teacher's
  full next-token distribution instead of one sampled token. It turns "behave as if told X" into
  the default state far faster than SFT on sampled answers. ``teacher_amplify`` = a > 0 moves
  the teacher further along what its prompt changes: its log-probs become
  ``(1 + a) log p(. | teacher prompt) - a log p(. | the student's prompt)`` (renormalised), a
  no-op where the two prompts are the same.

Devices and dtypes: the copy stays on the base's device and in its dtype (float32 stays float32;
a bfloat16 base trains in bfloat16 with the adapter's weights in float32), every batch goes to
the device of the model's input embedding, and ``FinetuneConfig.bf16`` autocasts on that
device's type (only float32 weights have anything to autocast). On the CPU in float32 nothing
changed: adapters trained before train again bit for bit, so cached organisms stay valid. The
copy holds a second set of the base's weights while training runs (a 7B model in bfloat16: 14 GB
more on its device).

Why a loop of our own rather than transformers' ``Trainer`` or trl's ``SFTTrainer`` /
``GKDTrainer``: each of these would have to be overridden where this module does its work, and
would change the numbers of every cached organism.

- Cached organisms are keyed by spec, config and data, not by the code that trained them, so
  their training must not drift: the data order is one ``torch.Generator`` stream seeded by
  ``seed`` (a longer run continues the same stream), peft's LoRA initialisation runs under a
  forked, seeded RNG (the caller's global RNG is left alone), and the warm-up is
  ``lr * (step + 1) / (warmup_steps + 1)``. ``Trainer`` seeds the global RNG, draws its own
  sampler order and warms up from ``lr = 0`` at step 0: every adapter would come out different
  under the same key (or every key would have to change).
- The pool: narrow examples mixed with ``general_ratio`` general ones, drawn without
  replacement, with the loss on narrow rows logged apart; early stopping on that narrow
  training loss over the last ``FLOOR_WINDOW`` steps (``loss_floor``), where ``Trainer``'s
  early stopping watches an evaluation metric.
- Distillation: the teacher is the same weights with the adapter disabled (no second model in
  memory), reading another prompt (``meta["teacher_prompt"]``) for a subset of the rows only,
  with the answer tokens aligned position for position, optionally amplified; the loss is the
  token-level KL over the whole vocabulary. trl's distillation trainers take a teacher model of
  their own and feed it the student's inputs.
- The LM head runs on answer positions only (``_answer_logits``), not on every position.
- Resume: a run refuses a checkpoint or a finished run made with another config, data or base
  (``_check_same_run``), naming the field; only when-to-stop fields may change, so a
  constant-lr run is extended by raising ``max_steps`` and continues the same schedule and data
  order, while a run with ``lr_decay`` (whose length is part of its schedule) cannot be.
  ``Trainer``'s ``resume_from_checkpoint`` restores its state without checking that the
  checkpoint was made on the same data or base.

What this loop does not do: several GPUs (DDP, FSDP, DeepSpeed), gradient checkpointing, or
float16 loss scaling. For those, train with ``Trainer`` or trl and analyse the adapter with
``mci converge --finetune LABEL=DIR``: this toolkit reads any peft LoRA adapter or full
checkpoint of the base.

Where things are: ``config`` (``FinetuneConfig``, ``FinetuneResult``, file names), ``batches``
(encoding, the teacher's view, collation, the seeded pool and order), ``general`` (the base's
own answers for the mix), ``loss`` (cross-entropy and the distillation KL), ``checkpoint``
(save, resume, same-run checks) and ``train`` (``finetune_lora`` and its loop).
"""

from mci_interp.organisms.finetune.batches import (
    TrainBatch,
    collate,
    encode_examples,
    encode_teacher,
    total_steps,
)
from mci_interp.organisms.finetune.config import (
    CHECKPOINT_DIR,
    FLOOR_WINDOW,
    LLAMA_QWEN_LINEAR,
    LOSSES_FILE,
    META_FILE,
    OBJECTIVES,
    TEACHER_PROMPT,
    FinetuneConfig,
    FinetuneResult,
)
from mci_interp.organisms.finetune.general import (
    GENERAL_ANSWER_TOKENS,
    N_GENERAL,
    cached_answers,
    general_answers,
    general_prompts,
)
from mci_interp.organisms.finetune.train import finetune_lora

__all__ = [
    "CHECKPOINT_DIR",
    "FLOOR_WINDOW",
    "GENERAL_ANSWER_TOKENS",
    "LLAMA_QWEN_LINEAR",
    "LOSSES_FILE",
    "META_FILE",
    "N_GENERAL",
    "OBJECTIVES",
    "TEACHER_PROMPT",
    "FinetuneConfig",
    "FinetuneResult",
    "TrainBatch",
    "cached_answers",
    "collate",
    "encode_examples",
    "encode_teacher",
    "finetune_lora",
    "general_answers",
    "general_prompts",
    "total_steps",
]
