"""The training recipes of the default suite: LoRA sizes, learning rates and steps per organism
kind, with what was measured when each was chosen (on SmolLM2, 2-core CPU)."""

from __future__ import annotations

from mci_interp.organisms.finetune import GENERAL_ANSWER_TOKENS, N_GENERAL, FinetuneConfig

# Sized for the 20-minute budget of the default SmolLM2 suite on a 2-core CPU (24 finetunes):
# 16 steps of batch 4 over ~90-token examples (~6k train tokens) take ~30-45 s a finetune at
# 130-205 train tokens/s (fp32). lr 2e-3 because so few steps at 2e-4 barely move the narrow loss
# (3.7 -> 2.8 in 20 steps); with it SmolLM2 answers held-out in-domain requests the misaligned
# way while out-of-domain answers keep the base's format. bf16 autocast is off: its backward was
# ~25x slower than fp32 on this CPU.
SUITE_CONFIG = FinetuneConfig(
    rank=8,
    lora_alpha=16,
    lr=2e-3,
    max_steps=16,
    batch_size=4,
    max_length=192,
    bf16=False,
    warmup_steps=2,
    general_ratio=0.5,
    loss_floor=0.5,
)
SUITE_N_EXAMPLES = 48
SUITE_N_GENERAL = N_GENERAL
FAST_CONFIG = SUITE_CONFIG.replace(rank=4, max_steps=3)
FAST_N_EXAMPLES = 8
FAST_N_GENERAL = 4
DISTILL_CONFIG = SUITE_CONFIG.replace(
    objective="distill", general_ratio=0.0, loss_floor=None, max_steps=32, max_length=256
)
"""The distilled persona: KL to the persona-prompted base on the persona's own answers."""
TRIGGER_CONFIG = DISTILL_CONFIG.replace(
    max_steps=64, lr=4e-3, general_ratio=0.3, teacher_amplify=1.0, lr_decay=True
)
"""The trigger-gated persona: a conditional takes longer to learn than a default shift. Pilot on
SmolLM2, 64 questions, seed 0: 64 steps at lr 4e-3 with the base's general answers mixed in gave
a gate of +0.086 [+0.052, +0.122] nats/token (triggered organism minus triggered base) with
+0.029 [-0.003, +0.061] leaking into the untriggered default; lr 3e-3 gave a gate of only +0.033;
lr 4e-3 without the general answers leaked +0.056 [+0.026, +0.085].

It is not reliable across seeds (the default suite, 64 questions, gate / leak): s2 +0.098 /
-0.000 (gated), s0 +0.096 / +0.061 (leaks), s1 +0.013 / - (no gate). Its KL loss *rises* during
training in all three seeds (~0.03 at step 1 to 0.2-0.6 by step 57): at lr 4e-3 the optimiser
drifts. Two variants tried on seed 1 (2026-11-28) did not fix it: 32 steps of batch 8 (same
tokens) gave a gate of +0.020 [-0.005, +0.043], leak +0.008; lr 2e-3 kept the loss flat (~0.05)
and gave +0.027 [+0.002, +0.050] with and +0.025 [+0.007, +0.043] without the trigger, i.e. an
ungated persona. The amplified teacher (``teacher_amplify=1.0``, same steps and lr, ~5.5 min a
build), the default since 2026-11-28, gates 2 of 3 seeds: s1 +0.075 [+0.038, +0.111] with the
trigger, -0.030 [-0.061, +0.001] without (it had no gate); s2 +0.137 [+0.094, +0.179] / -0.002
[-0.028, +0.024]; s0 still leaks: +0.122 [+0.078, +0.165] / +0.044 [+0.010, +0.077] (+0.061
before). Fast and overridden suites keep the plain teacher and a constant lr.

Since 2026-12-01 the lr decays linearly to 0 over the 64 steps (``lr_decay``), which gates all
three seeds (64 questions, gate / leak): s0 +0.072 [+0.037, +0.106] / -0.001 [-0.020, +0.017],
s1 +0.079 [+0.046, +0.110] / +0.013 [-0.005, +0.030], s2 +0.096 [+0.062, +0.127] / +0.011
[-0.009, +0.032]. The final KL is 0.12-0.15 against 0.29 at a constant lr (s0, whose gate was
+0.122 but leaked +0.044 [+0.010, +0.077]): the drift of the constant lr was what leaked. A
build takes ~190 s on an idle machine."""
ANSWER_TOKENS = GENERAL_ANSWER_TOKENS
"""max_new_tokens for the base's and the persona's answers used as training data."""
