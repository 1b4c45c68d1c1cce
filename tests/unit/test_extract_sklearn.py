"""The estimators are scikit-learn estimators: clone, Pipeline and grouped GridSearchCV work on
them, and they still recover a planted direction inside those."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone, is_classifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mci_interp.compare import cosine
from mci_interp.extract import METHODS, DiffMeans, LinearProbe, SaeLatents


def planted(n_groups=100, per_group=20, d=8, signal=3.0, seed=0):
    """Rows = prompt offset + unit noise + signal * v on label 1 (labels mixed within prompts)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v /= v.norm()
    groups = np.repeat(np.arange(n_groups), per_group)
    y = np.tile(np.arange(per_group) % 2, n_groups)
    offsets = 0.5 * torch.randn(n_groups, d, generator=g, dtype=torch.float64)
    X = offsets[groups] + torch.randn(len(groups), d, generator=g, dtype=torch.float64)
    X += signal * torch.as_tensor(y, dtype=torch.float64).unsqueeze(1) * v
    return X.float().numpy(), y, np.asarray([f"q{k}" for k in groups]), v


ESTIMATORS = [DiffMeans(weighting="token"), LinearProbe(C=0.3, cv=3), SaeLatents(top_k=2)]


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_estimators_are_sklearn_estimators_with_one_fit_signature(est):
    assert isinstance(est, BaseEstimator) and isinstance(est, TransformerMixin)
    assert set(METHODS.values()) == {DiffMeans, LinearProbe, SaeLatents}
    params = inspect.signature(type(est).fit).parameters
    assert list(params)[:4] == ["self", "X", "y", "groups"] and params["groups"].default is None
    assert all(p.kind is p.KEYWORD_ONLY for p in list(params.values())[4:])
    init = inspect.signature(type(est).__init__).parameters
    assert all(p.kind is p.KEYWORD_ONLY for n, p in init.items() if n != "self")
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    assert not any(k.endswith("_") for k in vars(twin))


def test_clone_pipeline_and_transform_recover_a_planted_direction():
    X, y, groups, v = planted()
    dm = DiffMeans().fit(X, y, groups)
    assert cosine(dm.direction_, v) > 0.99 and dm.n_features_in_ == 8
    again = clone(dm).fit(X, y)
    assert not hasattr(clone(dm), "direction_")
    assert torch.equal(again.direction_, dm.direction_)
    # transform is the projection on the unit direction, in the kind it was given
    proj = dm.transform(X)
    assert isinstance(proj, np.ndarray) and proj.shape == (len(y), 1)
    u = (dm.direction_ / dm.direction_.norm()).numpy()
    assert np.allclose(proj[:, 0], X.astype(np.float64) @ u)
    t = dm.transform(torch.as_tensor(X).bfloat16())
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.shape == (len(y), 1)
    # centring in a pipeline does not move a difference of means
    centred = make_pipeline(StandardScaler(with_std=False), DiffMeans()).fit(X, y)
    assert torch.allclose(centred[-1].direction_, dm.direction_)
    # the estimator's projection feeds a classifier
    pipe = make_pipeline(DiffMeans(), LogisticRegression()).fit(X, y)
    assert cosine(pipe[0].direction_, v) > 0.99 and pipe.score(X, y) > 0.9
    # the probe is a classifier whose direction is in raw space
    probe = LinearProbe(C=0.1, cv=None).fit(X, y, groups)
    assert is_classifier(probe) and cosine(probe.direction_, v) > 0.99
    assert probe.score(X, y) > 0.9 and np.isnan(probe.auroc_)  # cv=None: no internal CV
    assert probe.predict_proba(X).shape == (len(y), 2)
    assert np.array_equal(probe.predict(X), (probe.decision_function(X) > 0).astype(np.int64))
    assert np.allclose(
        probe.transform(X)[:, 0],
        X.astype(np.float64) @ (probe.coef_raw_ / np.linalg.norm(probe.coef_raw_)),
    )
    with pytest.raises(ValueError, match="d_model 5 but"):
        dm.transform(X[:, :5])


def test_grouped_grid_search_with_group_kfold():
    X, y, groups, v = planted()
    # a pipeline's folds are split by prompt; its DiffMeans recovers the planted direction
    search = GridSearchCV(
        make_pipeline(DiffMeans(), LogisticRegression()),
        {"logisticregression__C": [0.1, 1.0]},
        cv=GroupKFold(n_splits=3),
    ).fit(X, y, groups=groups)
    assert cosine(search.best_estimator_[0].direction_, v) > 0.99
    assert search.best_score_ > 0.9
    # with metadata routing, the prompt ids reach the probe's own fit as well as the splitter
    with sklearn.config_context(enable_metadata_routing=True):
        probe = LinearProbe(cv=None, ungrouped_baseline=False).set_fit_request(groups=True)
        search = GridSearchCV(
            probe, {"C": [0.01, 0.1, 1.0]}, cv=GroupKFold(n_splits=3), scoring="roc_auc"
        ).fit(X, y, groups=groups)
    best = search.best_estimator_
    assert best.grouped_ and best.n_groups_ == 100  # refit saw the groups
    assert cosine(best.direction_, v) > 0.99 and search.best_score_ > 0.95
    assert set(search.cv_results_["param_C"]) == {0.01, 0.1, 1.0}


def test_extract_keeps_fit_metadata_per_estimator():
    """``extract`` passes each estimator only the metadata its fit declares."""
    from mci_interp.extract import extract
    from mci_interp.sites import Site

    X, y, groups, _ = planted(n_groups=20, per_group=4)
    with pytest.raises(ValueError, match="does not use a control model"):
        from mci_interp.extract.api import _fit_on

        _fit_on(
            LinearProbe(cv=2), torch.as_tensor(X), torch.as_tensor(y), list(groups), None,
            torch.as_tensor(X), Site(1),
        )  # fmt: skip
    d = extract(DiffMeans(), torch.as_tensor(X), y, list(groups), site=Site(1))
    assert d.provenance.params["weighting"] == "example" and d.provenance.n_pos == 40
