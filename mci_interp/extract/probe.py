"""Logistic-regression probe with prompt-grouped cross-validation and a prompt-identity baseline."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.base import ClassifierMixin, TransformerMixin
from torch import Tensor

from mci_interp.direction import Param
from mci_interp.extract._base import (
    Estimator,
    as_float64,
    as_groups,
    as_labels,
    check_rows,
    like_input,
    project_rows,
    wide_dtype,
)

log = logging.getLogger(__name__)


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def _nanmean(x: list[float]) -> float:
    arr = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


class LinearProbe(ClassifierMixin, TransformerMixin, Estimator):
    """Standardised L2 logistic regression whose weight vector, mapped back to raw activation
    space (divided by the feature std), is the direction.

    Cross-validation folds are grouped by prompt (``StratifiedGroupKFold``: grouped, and
    class-balanced where possible), so answers to one question never sit on both sides of a split.
    Besides the grouped AUROC it reports, on row-level (ungrouped) folds, the probe's AUROC and a
    *prompt-identity* baseline that scores each held-out row by its prompt's positive rate in the
    training fold and sees nothing else: when that baseline is close to the ungrouped AUROC, a
    row-level evaluation measures which prompt a row came from, not the concept. ``cv=None``
    skips this internal cross-validation (inside a ``GridSearchCV``, which does its own).

    As a scikit-learn classifier it has ``decision_function``, ``predict_proba``, ``predict`` and
    ``score`` (accuracy); ``transform(X)`` is each row's projection on the unit direction,
    ``[rows, 1]``.

    Fitted: ``direction_``/``coef_raw_`` (raw space, float64), ``coef_`` (standardised space),
    ``intercept_``, ``intercept_raw_``, ``mean_``, ``scale_``, ``auroc_`` (mean over grouped
    folds), ``auroc_folds_``, ``auroc_oof_`` (pooled out-of-fold), ``auroc_ungrouped_``,
    ``prompt_identity_auroc_`` (+ ``_folds_``), ``grouped_``, ``n_groups_``, ``classes_``,
    ``n_features_in_``.
    """

    method = "probe"

    def __init__(
        self,
        *,
        C: float = 1.0,
        cv: int | None = 5,
        standardize: bool = True,
        class_weight: str | None = "balanced",
        max_iter: int = 2000,
        ungrouped_baseline: bool = True,
        seed: int = 0,
    ) -> None:
        self.C = C
        self.cv = cv
        self.standardize = standardize
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.ungrouped_baseline = ungrouped_baseline
        self.seed = seed

    # --- folds -----------------------------------------------------------------------------
    def cv_splits(
        self, y: Any, groups: Sequence[Any] | None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The (train, test) row indices used for grouped cross-validation."""
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

        lab = np.asarray(y.cpu() if isinstance(y, Tensor) else y).astype(np.int64).ravel()
        n = lab.shape[0]
        codes = as_groups(groups, n)
        self._check_cv(lab, codes)
        if codes is None:
            yield from StratifiedKFold(self.cv, shuffle=True, random_state=self.seed).split(
                np.zeros(n), lab
            )
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*least populated class.*")
            splitter = StratifiedGroupKFold(self.cv, shuffle=True, random_state=self.seed)
            yield from splitter.split(np.zeros(n), lab, codes)

    def _check_cv(self, lab: np.ndarray, codes: np.ndarray | None) -> None:
        if isinstance(self.cv, bool) or not isinstance(self.cv, int) or self.cv < 2:
            raise ValueError(
                f"cv must be an int >= 2 (number of folds) or None (no internal "
                f"cross-validation), got {self.cv!r}"
            )
        n_units = len(np.unique(codes)) if codes is not None else lab.shape[0]
        if n_units < self.cv:
            what = "groups (prompts)" if codes is not None else "rows"
            raise ValueError(
                f"only {n_units} {what} for cv={self.cv} folds; lower cv to at most {n_units} or "
                "add prompts"
            )
        counts = [int((lab == c).sum()) for c in (0, 1)]
        if max(counts) < self.cv:  # stratified folds need a class with a row in every fold
            raise ValueError(
                f"each class has fewer rows than cv={self.cv} folds (label 0: {counts[0]}, label "
                f"1: {counts[1]}); lower cv to at most {max(counts)} or add rows"
            )
        if codes is not None:
            for c in (0, 1):
                n_g = len(np.unique(codes[lab == c]))
                if n_g < 2:
                    raise ValueError(
                        f"label {c} occurs in only {n_g} group(s); grouped cross-validation needs "
                        "each class in at least 2 prompts"
                    )

    def _model(self) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        lr = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=self.class_weight)
        return make_pipeline(StandardScaler(with_std=self.standardize), lr)

    def _cv_auroc(self, x: np.ndarray, lab: np.ndarray, splits: list) -> tuple[list[float], float]:
        folds, oof = [], np.full(lab.shape[0], np.nan)
        for train, test in splits:
            m = self._model().fit(x[train], lab[train])
            s = m.decision_function(x[test])
            oof[test] = s
            folds.append(_auroc(lab[test], s))
        ok = np.isfinite(oof)
        return folds, _auroc(lab[ok], oof[ok])

    # --- fit -------------------------------------------------------------------------------
    def fit(
        self,
        X: Float[Tensor, "rows d_model"],
        y: Any,
        groups: Sequence[Any] | None = None,
    ) -> LinearProbe:
        """Cross-validate (grouped by ``groups``, prompt ids), then fit on all rows."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import StratifiedKFold

        xt = as_float64(X)
        lab = as_labels(y, xt.shape[0]).numpy()
        x = xt.numpy()
        codes = as_groups(groups, x.shape[0])
        if codes is None and self.cv is not None:
            log.warning(
                "LinearProbe.fit without groups: folds split rows, not prompts; pass "
                "groups=prompt ids so answers to one prompt stay on one side"
            )
        self.grouped_ = codes is not None
        self.n_groups_ = int(len(np.unique(codes))) if codes is not None else int(x.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.auroc_folds_: list[float] = []
            self.auroc_oof_ = float("nan")
            if self.cv is not None:
                splits = list(self.cv_splits(lab, groups))
                self.auroc_folds_, self.auroc_oof_ = self._cv_auroc(x, lab, splits)
            self.auroc_ = _nanmean(self.auroc_folds_)
            if any(not np.isfinite(a) for a in self.auroc_folds_):
                log.warning(
                    "some grouped folds held one class only; their AUROC is NaN and the "
                    "mean skips them"
                )
            self.auroc_ungrouped_ = float("nan")
            self.prompt_identity_auroc_ = float("nan")
            self.prompt_identity_auroc_folds_: list[float] = []
            if self.ungrouped_baseline and self.cv is not None:
                row_splits = list(
                    StratifiedKFold(self.cv, shuffle=True, random_state=self.seed).split(
                        np.zeros(len(lab)), lab
                    )
                )
                self.auroc_ungrouped_ = _nanmean(self._cv_auroc(x, lab, row_splits)[0])
                if codes is not None:
                    self.prompt_identity_auroc_folds_ = [
                        _prompt_identity_fold(lab, codes, tr, te) for tr, te in row_splits
                    ]
                    self.prompt_identity_auroc_ = _nanmean(self.prompt_identity_auroc_folds_)
            model = self._model().fit(x, lab)
        scaler, lr = model[0], model[-1]
        self.mean_ = np.asarray(scaler.mean_, dtype=np.float64)
        self.scale_ = (
            np.asarray(scaler.scale_, dtype=np.float64)
            if self.standardize
            else np.ones_like(self.mean_)
        )
        self.coef_ = lr.coef_[0].astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        self.coef_raw_ = self.coef_ / self.scale_
        self.intercept_raw_ = float(self.intercept_ - (self.coef_raw_ * self.mean_).sum())
        self.direction_ = torch.from_numpy(self.coef_raw_.copy())
        self.auroc_train_ = _auroc(lab, x @ self.coef_raw_ + self.intercept_raw_)
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = int(x.shape[1])
        return self

    def decision_function(self, X: Float[Tensor, "rows d_model"]) -> Float[Tensor, " rows"]:
        """Logit of the positive class for raw activations, in float64 on ``X``'s device (a
        tensor for a tensor, else a NumPy array)."""
        self.check_fitted()
        x = check_rows(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has d_model {x.shape[1]} but the probe was fitted on {self.n_features_in_}"
            )
        wide = wide_dtype(x.device)
        return like_input(X, x.to(wide) @ self.direction_.to(x.device, wide) + self.intercept_raw_)

    def predict_proba(self, X: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows 2"]:
        """Probabilities of labels 0 and 1, ``[rows, 2]``."""
        z = torch.as_tensor(self.decision_function(X))
        p = torch.sigmoid(z)
        return like_input(X, torch.stack([1 - p, p], dim=1))

    def predict(self, X: Float[Tensor, "rows d_model"]) -> Any:
        """Label 1 where the logit is positive, else 0."""
        z = torch.as_tensor(self.decision_function(X))
        return like_input(X, (z > 0).long())

    def transform(self, X: Float[Tensor, "rows d_model"]) -> Float[Tensor, "rows 1"]:
        """Each row's scalar projection on the unit (raw-space) direction, ``[rows, 1]``."""
        self.check_fitted()
        return project_rows(X, self.direction_.unsqueeze(0))

    def fit_summary(self) -> dict[str, Param]:
        self.check_fitted()

        def f(v: float) -> float | None:
            return None if not np.isfinite(v) else round(float(v), 6)

        return {
            "auroc": f(self.auroc_),
            "auroc_oof": f(self.auroc_oof_),
            "auroc_ungrouped": f(self.auroc_ungrouped_),
            "prompt_identity_auroc": f(self.prompt_identity_auroc_),
            "grouped": self.grouped_,
            "n_groups": self.n_groups_,
        }


def _prompt_identity_fold(
    lab: np.ndarray, codes: np.ndarray, train: np.ndarray, test: np.ndarray
) -> float:
    """AUROC of scoring each test row by its prompt's positive rate among training rows (the
    global training rate for prompts unseen in training)."""
    G = int(codes.max()) + 1
    pos = np.bincount(codes[train], weights=lab[train].astype(np.float64), minlength=G)
    cnt = np.bincount(codes[train], minlength=G).astype(np.float64)
    glob = lab[train].mean()
    rate = np.where(cnt > 0, pos / np.maximum(cnt, 1), glob)
    return _auroc(lab[test], rate[codes[test]])
