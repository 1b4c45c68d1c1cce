"""Three lenses on one question: do different narrow finetunes share a misalignment direction?

- **difference of means** (``analysis.convergence``): the domains' organism-minus-control
  contrasts, their signed cosines against random-direction nulls (the verdict's lens, with the
  transfer matrix);
- **probe** (``analysis.probes``): a probe for one domain's finetunes-vs-controls tested on
  another's, AUROC against a label-swapped null;
- **SAE latents** (``analysis.latents``): the overlap of the domains' rising latents against
  sign-flip and shuffled-latent nulls (at the SAE's layer only).

``three_lenses`` reads a ``ConvergenceReport`` (which holds all three) into one table per layer
and, per pair of domains at the analysis layer, what each lens says; it names the lens that
carries the verdict and where the others agree or not. It computes no new statistic and changes
no rule: each lens keeps its own nulls and bars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mci_interp.analysis.convergence import ConvergenceReport

LENSES = ("difference of means", "probe", "SAE latents")


@dataclass(frozen=True, slots=True)
class LensLayer:
    """Each lens's summary at one layer (NaN / None where that lens was not measured there)."""

    layer: int
    dm_pairs: int  # pairs whose contrast cosine beats its null
    dm_mean_cos: float
    probe_cells: int | None  # ordered cross-domain probe cells that beat their null
    probe_transfer: float  # mean cross-domain AUROC
    probe_null95: float
    sae_pairs: int | None  # pairs whose rising latents overlap beyond both nulls
    sae_mean_overlap: float
    sae_mean_bar: float
    n_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class PairLenses:
    """What each lens says about one pair of domains at the analysis layer (None: not
    measured)."""

    a: str
    b: str
    dm: bool
    probe: bool | None  # both directions of transfer beat their null
    sae: bool | None

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "dm": self.dm, "probe": self.probe, "sae": self.sae}


@dataclass(frozen=True, slots=True)
class ThreeLenses:
    layers: tuple[LensLayer, ...]
    analysis_layer: int
    pairs: tuple[PairLenses, ...]
    says: dict[str, str]  # lens -> "all pairs" | "some pairs" | "no pair" | "not measured"
    agreement: str
    carried_by: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [x.to_dict() for x in self.layers],
            "analysis_layer": self.analysis_layer,
            "pairs": [p.to_dict() for p in self.pairs],
            "says": dict(self.says),
            "agreement": self.agreement,
            "carried_by": self.carried_by,
        }


def _says(flags: list[bool | None]) -> str:
    got = [f for f in flags if f is not None]
    if not got:
        return "not measured"
    return "all pairs" if all(got) else "some pairs" if any(got) else "no pair"


def three_lenses(report: ConvergenceReport) -> ThreeLenses:
    """The three lenses side by side (module docstring)."""
    L = report.analysis_layer
    probes, sae = report.probes, report.latents
    rows = []
    for lc in report.layers:
        px = next((x for x in probes.layers if x.layer == lc.layer), None) if probes else None
        sx = sae if sae is not None and sae.layer == lc.layer else None
        off = [c for c in px.cells if c.train != c.test] if px else []
        rows.append(
            LensLayer(
                layer=lc.layer,
                dm_pairs=sum(p.beats_null for p in lc.pairs),
                dm_mean_cos=sum(p.cos for p in lc.pairs) / max(len(lc.pairs), 1),
                probe_cells=None if px is None else sum(c.significant for c in off),
                probe_transfer=math.nan if px is None else px.transfer.mean,
                probe_null95=math.nan if px is None else px.transfer_null95,
                sae_pairs=None if sx is None else sum(p.shared for p in sx.pairs),
                sae_mean_overlap=math.nan
                if sx is None
                else sum(p.overlap for p in sx.pairs) / max(len(sx.pairs), 1),
                sae_mean_bar=math.nan
                if sx is None
                else sum(p.overlap_bar for p in sx.pairs) / max(len(sx.pairs), 1),
                n_pairs=len(lc.pairs),
            )
        )
    lc = report.at(L)
    px = next((x for x in probes.layers if x.layer == L), None) if probes else None
    sx = sae if sae is not None and sae.layer == L else None
    pairs = []
    for p in lc.pairs:
        probe = (
            None if px is None else px.cell(p.a, p.b).significant and px.cell(p.b, p.a).significant
        )
        lat = None if sx is None else next(q.shared for q in sx.pairs if {q.a, q.b} == {p.a, p.b})
        pairs.append(PairLenses(p.a, p.b, p.beats_null, probe, lat))
    says = {
        LENSES[0]: _says([p.dm for p in pairs]),
        LENSES[1]: _says([p.probe for p in pairs]),
        LENSES[2]: _says([p.sae for p in pairs]),
    }
    return ThreeLenses(
        layers=tuple(rows),
        analysis_layer=L,
        pairs=tuple(pairs),
        says=says,
        agreement=_agreement(pairs, says, sae_layer=None if sae is None else sae.layer, L=L),
        carried_by=_carried_by(report, says),
    )


def _agreement(
    pairs: list[PairLenses], says: dict[str, str], *, sae_layer: int | None, L: int
) -> str:
    measured = [k for k, v in says.items() if v != "not measured"]
    if sae_layer is not None and sae_layer != L:
        note = f" (the SAE reads layer {sae_layer}, not the analysis layer {L})"
    else:
        note = ""
    agree, differ = [], []
    for p in pairs:
        votes = {LENSES[0]: p.dm, LENSES[1]: p.probe, LENSES[2]: p.sae}
        votes = {k: v for k, v in votes.items() if v is not None}
        yes = [k for k, v in votes.items() if v]
        if len(set(votes.values())) <= 1:
            agree.append(f"{p.a}~{p.b} ({'shared' if yes else 'not shared'})")
        else:
            differ.append(f"{p.a}~{p.b} (shared by {', '.join(yes)} only)")
    out = f"at layer {L}, {len(measured)} lenses measured{note}; "
    out += "they agree on " + (", ".join(agree) if agree else "no pair")
    if differ:
        out += "; they disagree on " + ", ".join(differ)
    return out


def _carried_by(report: ConvergenceReport, says: dict[str, str]) -> str:
    """Which lens the verdict rests on, and whether the others back it."""
    v = report.verdict.split(" (")[0]
    others = {k: s for k, s in says.items() if k != LENSES[0] and s != "not measured"}
    backing = "; ".join(f"{k} lens: {s} shared" for k, s in others.items())
    transfer = report.transfer is not None and bool(report.transfer.testable(report.removable))
    base = "the difference-of-means lens (contrast cosines" + (
        " and transfer)" if transfer else "; transfer untestable)"
    )
    if v == "not converged":
        found = [k for k, s in says.items() if s in ("all pairs", "some pairs")]
        if not found:
            return f"{v}: no lens finds a shared direction. Read from {base}; {backing}"
        return (
            f"{v}: read from {base}, but the {' and '.join(found)} lens finds some pair shared: "
            f"the lenses disagree ({backing})"
        )
    return f"{v}: carried by {base}; {backing}" if backing else f"{v}: carried by {base}"
