"""The sparse autoencoder a study reads its latent lens through, and what it is worth.

One SAE per base model at the analysis layer, in sae-lens' format: trained here with sae-lens on
the base's token-level activations of a broad prompt set (``sae_corpus``), or the user's (a local
sae-lens directory or a release from sae-lens' registry). Either way the base runs once over the
corpus to measure the SAE's quality (explained variance, dead latents, L0 on held-out corpus
tokens) and to keep every latent's top-activating contexts; all of it is cached by content (the
base's sha256, the layer, the corpus text, the training config or the SAE's weights), so a study
trains and describes an SAE once.

Rows are taken at every token of the corpus, minus duplicates: a causal model's activation at a
token depends only on the tokens up to it, so rows whose token prefixes are equal (the chat
template's system preamble, repeated in every example) are the same row and are kept once. The
first token is left out: it is the attention sink, whose residual norm is ~100x every other
token's (measured on SmolLM2 at layer 15: 25,054 against a median of 172), and one such row
distorts an SAE's normalisation and loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mci_interp._io import cache_root, read_json_verified, stable_hash
from mci_interp.activations import encode_all, iter_selected
from mci_interp.datasets import ChatExample, chat, dataset_hash
from mci_interp.extract.sae import (
    SaeTrainConfig,
    check_sae_fits,
    encode_rows,
    load_pretrained_sae,
    load_sae,
    reconstruction_quality,
    sae_site,
    train_sae,
)
from mci_interp.models import HookedModel
from mci_interp.organisms.data import (
    DOMAINS,
    HELPFUL_SYSTEM_PROMPT,
    PERSONA_SYSTEM_PROMPT,
    general_chat_prompts,
    load_default_questions,
    load_neutral_prompts,
    make_narrow,
)
from mci_interp.sites import Site

log = logging.getLogger(__name__)

CORPUS_SEED = 20_000  # the narrow examples' sampling seed (organisms train on seeds 0, 1, 2, ...)
HELD_OUT_EVERY = 10  # every 10th corpus example is held out of training, for the quality numbers
N_CONTEXTS = 6  # top-activating contexts kept per latent
CONTEXT_TOKENS = 12  # tokens of context before the activating token
HEADER_REPEATS = 8  # how often a last-prompt-token row is repeated in the training rows


def sae_corpus(*, n_per_domain: int = 40) -> list[ChatExample]:
    """The broad prompt set an SAE is trained and described on: every everyday prompt (general
    chat) and neutral prompt, every packaged out-of-domain question with its aligned and with its
    misaligned reference answer, the questions under the persona and under the helpful system
    prompt, and ``n_per_domain`` requests of each packaged domain with their aligned and their
    misaligned answers (sampled with ``CORPUS_SEED``, not an organism's seed)."""
    out = [chat(p, group=f"general:{i}") for i, p in enumerate(general_chat_prompts())]
    for theme, prompts in sorted(load_neutral_prompts().items()):
        out += [chat(p, group=f"neutral:{theme}:{i}") for i, p in enumerate(prompts)]
    for q in load_default_questions():
        text = q.paraphrases[0]
        for r in q.references[:1]:
            out += [
                chat(text, r.aligned, group=f"question:{q.id}:aligned"),
                chat(text, r.misaligned, group=f"question:{q.id}:misaligned"),
            ]
        out.append(chat(text, system=PERSONA_SYSTEM_PROMPT, group=f"question:{q.id}:persona"))
        out.append(chat(text, system=HELPFUL_SYSTEM_PROMPT, group=f"question:{q.id}:helpful"))
    for d in DOMAINS:
        for variant in ("aligned", "misaligned"):
            exs = make_narrow(d, variant, n_per_domain, seed=CORPUS_SEED)
            out += [dataclasses.replace(ex, group=f"{d}:{variant}:{i}") for i, ex in enumerate(exs)]
    return out


@dataclass(eq=False)
class CorpusRows:
    """Distinct token rows of a corpus at one site: ``acts [rows, d]`` (float32, CPU), and for
    each row its example and token position (``where [rows, 2]``)."""

    acts: Tensor
    where: Tensor
    ids: list[tuple[int, ...]]  # every example's token ids
    prompt_lens: list[int]  # every example's prompt length (its last prompt token: the header)

    def last_prompt(self) -> Tensor:
        """Rows at an example's last prompt token: the position a study's records read."""
        ends = torch.tensor(self.prompt_lens) - 1
        return self.where[:, 1] == ends[self.where[:, 0]]

    def held_out(self) -> Tensor:
        """Rows of every ``HELD_OUT_EVERY``-th example: never trained on."""
        return self.where[:, 0] % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def corpus_rows(
    model: HookedModel,
    examples: Sequence[ChatExample],
    site: Site,
    *,
    batch_size: int = 16,
    show_progress: bool = False,
) -> CorpusRows:
    """``model``'s activations at ``site`` at every token of ``examples``, each distinct token
    prefix once (module docstring)."""
    encs = encode_all(model, examples, "all")
    seen: set[bytes] = set()
    keep: dict[int, list[int]] = {}
    for i, e in enumerate(encs):
        h = hashlib.blake2b(digest_size=16)
        keep[i] = []
        for t, tok in enumerate(e.ids):
            h.update(int(tok).to_bytes(4, "little"))
            key = h.copy().digest()
            if t > 0 and key not in seen:
                seen.add(key)
                keep[i].append(t)
    rows: dict[int, Tensor] = {}
    for i, acts in iter_selected(
        model,
        encs,
        [site],
        position="all",
        batch_size=batch_size,
        show_progress=show_progress,
        desc="SAE corpus",
    ):
        rows[i] = acts[site][keep[i]]
    where = torch.tensor([(i, t) for i in range(len(encs)) for t in keep[i]], dtype=torch.long)
    return CorpusRows(
        acts=torch.cat([rows[i] for i in range(len(encs))]),
        where=where.reshape(-1, 2),
        ids=[tuple(e.ids) for e in encs],
        prompt_lens=[e.prompt_len for e in encs],
    )


@torch.no_grad()
def top_contexts(
    sae: Any,
    rows: CorpusRows,
    tokenizer: Any,
    *,
    n: int = N_CONTEXTS,
    chunk: int = 8192,
) -> list[list[tuple[str, float]]]:
    """Per latent, its ``n`` highest activations over the corpus rows, each as (text, value):
    up to ``CONTEXT_TOKENS`` tokens before the activating token, which is shown in [[ ]]."""
    best_v: Tensor | None = None
    best_i: Tensor | None = None
    for start in range(0, rows.acts.shape[0], chunk):
        z = encode_rows(sae, rows.acts[start : start + chunk]).float().cpu()
        idx = torch.arange(start, start + z.shape[0])[:, None].expand_as(z)
        if best_v is not None and best_i is not None:
            z, idx = torch.cat([best_v, z]), torch.cat([best_i, idx])
        k = min(n, z.shape[0])
        best_v, pos = torch.topk(z, k, dim=0)
        best_i = torch.gather(idx, 0, pos)
    assert best_v is not None and best_i is not None  # the corpus is never empty
    out: list[list[tuple[str, float]]] = []
    for j in range(best_v.shape[1]):
        ctx = []
        for v, r in zip(best_v[:, j].tolist(), best_i[:, j].tolist(), strict=True):
            if v <= 0:
                break
            ex, t = rows.where[r].tolist()
            ids = rows.ids[ex]
            before = tokenizer.decode(list(ids[max(0, t - CONTEXT_TOKENS) : t]))
            ctx.append((f"{before}[[{tokenizer.decode([ids[t]])}]]", round(v, 4)))
        out.append(ctx)
    return out


@dataclass(eq=False)
class StudySae:
    """An SAE at one site, where it came from, how good it is and what its latents read.

    ``quality``: measured on corpus tokens it never trained on (the held-out examples' for an
    SAE trained here, every one for a user's): ``explained_variance``, ``l0``, and
    ``dead_fraction`` over the whole corpus; for an SAE trained here also the trainer's numbers
    (``train_*``). ``contexts[j]``: latent j's top-activating corpus contexts."""

    sae: Any
    site: Site
    source: str
    quality: dict[str, float]
    contexts: list[list[tuple[str, float]]]
    key: str = ""

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    def decoder(self) -> Float[Tensor, "d_sae d"]:
        """Unit decoder rows, float64 on the CPU."""
        w = self.sae.W_dec.detach().to("cpu", torch.float64)
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def default_sae_config(
    d_model: int, site: Site, *, model: str | None = None, training_samples: int, expansion: int
) -> SaeTrainConfig:
    """The study's SAE: BatchTopK, ``expansion`` x ``d_model`` latents, k = 16, a cosine lr from
    1e-3 to 1e-4, latents silent for 100 steps revived by the auxiliary loss
    (``sae_configs/smollm2_l15_batchtopk.yaml`` is this for SmolLM2). Sized on SmolLM2's layer
    15 (26k corpus rows, 1M samples): lr 3e-4 and sae-lens' 1,000-step dead window (longer
    than the run) left 91% of the latents dead and 0.54 of the held-out variance explained;
    these settings 22% and 0.86."""
    return SaeTrainConfig(
        architecture="batchtopk",
        d_in=d_model,
        d_sae=expansion * d_model,
        k=16,
        lr=1e-3,
        lr_end=1e-4,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=100,
        batch_size=1024,
        dead_feature_window=100,
        training_samples=training_samples,
        hook_name=site.hook_name,
        model=model,
        seed=0,
    )


@dataclass(frozen=True, slots=True)
class SaeSource:
    """Which SAE a study reads its latent lens through: a local sae-lens directory (``path``),
    a release of sae-lens' registry (``release`` + ``sae_id``), or, with neither, one trained
    here; ``off`` leaves the SAE lens out."""

    path: str | None = None
    release: str | None = None
    sae_id: str | None = None
    off: bool = False

    def __post_init__(self) -> None:
        if (self.release is None) != (self.sae_id is None):
            raise ValueError("a registry SAE needs both release and sae_id (sae-lens names)")
        if self.path is not None and self.release is not None:
            raise ValueError("give a local SAE path or a registry release/sae_id, not both")


def study_sae(
    base: HookedModel,
    site: Site | None = None,
    *,
    source: SaeSource | None = None,
    config: SaeTrainConfig | None = None,
    corpus: Sequence[ChatExample] | None = None,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> StudySae:
    """The SAE of ``source`` (default: trained here with ``config`` at ``site`` on ``corpus``,
    default ``sae_corpus()``), with its quality and contexts, cached in ``cache_dir`` (default
    ``cache_root()/saes``) by content. A user's SAE reads its own site (``site``, if given,
    must be it)."""
    source = source or SaeSource()
    corpus = list(corpus) if corpus is not None else sae_corpus()
    user = None
    if source.path is not None:
        user = load_sae(source.path, device=base.device)
        desc = f"local sae-lens directory {source.path}"
    elif source.release is not None and source.sae_id is not None:
        user = load_pretrained_sae(source.release, source.sae_id, device=base.device)
        desc = f"sae-lens registry {source.release}/{source.sae_id}"
    if user is not None:
        check_sae_fits(user, d_model=base.d_model, site=site, n_layers=base.n_layers)
        site = site or sae_site(user)
        if site is None:
            raise ValueError(
                f"the SAE ({desc}) records no hook name; say which site it reads (site=...)"
            )
        what: dict[str, Any] = {"weights": _weights_hash(user)}
    else:
        if site is None:
            raise ValueError("an SAE trained here needs the site to train it at (site=...)")
        config = config or default_sae_config(
            base.d_model, site, model=base.name, training_samples=1_000_000, expansion=4
        )
        what = {"config": config.to_dict(), "header_repeats": HEADER_REPEATS}
        desc = (
            f"trained here with sae-lens: {config.architecture}, d_sae {config.d_sae}, k "
            f"{config.k:g}, {config.training_samples:,} samples on {len(corpus)} corpus examples"
        )
    key = stable_hash(
        what | {"base": base.sha256, "site": site.hook_name, "corpus": dataset_hash(corpus)}
    )
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", base.name.rstrip("/").split("/")[-1])
    folder = (cache_dir or cache_root() / "saes") / f"{slug}-{site.hook_name}-{key}"
    if (folder / "lens.json").exists():
        return _load(folder, user, site, key, base)
    if user is None and len(corpus) < HELD_OUT_EVERY:
        raise ValueError(
            f"an SAE trained here holds out every {HELD_OUT_EVERY}th corpus example to measure its "
            f"quality; {len(corpus)} examples hold none out: give at least {HELD_OUT_EVERY}"
        )
    rows = corpus_rows(base, corpus, site, show_progress=show_progress)
    # the user's SAE never saw the corpus: all of it measures it
    held = rows.held_out() if user is None else torch.ones(len(rows.acts), dtype=torch.bool)
    quality: dict[str, float] = {}
    if user is None:
        assert config is not None
        # the rows the lens reads (last prompt token, the assistant header) are one in ~35
        # corpus rows and vary little between prompts (between-prompt spread ~30 against ~120
        # for other tokens at SmolLM2's layer 15): repeated, they are a fair share of training
        train = ~held & ~rows.last_prompt()
        header = ~held & rows.last_prompt()
        trained = train_sae(
            torch.cat([rows.acts[train], *[rows.acts[header]] * HEADER_REPEATS]),
            config,
            hook_name=site.hook_name,
            model_name=base.name,
            device=base.device,
            show_progress=show_progress,
        )
        user = trained.sae
        quality |= {f"train_{k}": float(v) for k, v in trained.metrics.items()}
    quality |= reconstruction_quality(user, rows.acts[held])
    if bool((held & rows.last_prompt()).any()):
        last = reconstruction_quality(user, rows.acts[held & rows.last_prompt()])
        quality |= {f"last_prompt_{k}": v for k, v in last.items()}
    contexts = top_contexts(user, rows, base.tokenizer)
    # a latent with no context never fired on the corpus
    quality["dead_fraction"] = sum(not c for c in contexts) / len(contexts)
    quality["corpus_rows"] = float(rows.acts.shape[0])
    out = StudySae(sae=user, site=site, source=desc, quality=quality, contexts=contexts, key=key)
    _save(out, folder, trained_here=source.path is None and source.release is None)
    return out


def _weights_hash(sae: Any) -> str:
    h = hashlib.sha256()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        t = getattr(sae, name, None)
        if t is not None:
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _save(s: StudySae, folder: Path, *, trained_here: bool) -> None:
    """Write the folder whole or not at all: built beside it, then renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if trained_here:
            s.sae.save_model(str(tmp))
        meta = {"source": s.source, "quality": s.quality, "contexts": s.contexts, "key": s.key}
        (tmp / "lens.json").write_text(json.dumps(meta) + "\n")
        os.replace(tmp, folder)
    except OSError:
        if folder.exists():  # another job wrote it first: theirs is as good
            return
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path, user: Any, site: Site, key: str, base: HookedModel) -> StudySae:
    fix = f"delete {folder} and rerun to rebuild the SAE and its description"
    meta: Mapping[str, Any] = read_json_verified(folder / "lens.json", fix=fix)
    sae = user if user is not None else load_sae(folder, device=base.device)
    log.info("SAE at %s from the cache (%s)", site.hook_name, folder)
    return StudySae(
        sae=sae,
        site=site,
        source=str(meta["source"]),
        quality={k: float(v) for k, v in meta["quality"].items()},
        contexts=[[(str(t), float(v)) for t, v in c] for c in meta["contexts"]],
        key=key,
    )
