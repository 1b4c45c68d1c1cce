"""Study records are verified on read: an altered, truncated or NaN-holding record is refused
naming its file; records of the older layout still read; concurrent writers of one record
leave a consistent record whatever their interleaving."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mci_interp._io import IntegrityError
from mci_interp.analysis.study import Record, RecordStore
from mci_interp.evaluate import EvalResult


def _record(name="narrow-medical-s0-abc@gate5", seed=0, with_acts=True):
    g = torch.Generator().manual_seed(seed)
    score = EvalResult(
        scorer="logprob_contrast",
        model="m",
        question_ids=("q1", "q2"),
        themes=("a", "b"),
        scores=torch.randn(2, generator=g),
    )
    acts = torch.randn(3, 2, 4, generator=g) if with_acts else None
    return Record(name=name, acts=acts, score=score, indomain=None, generations=["x", "y"])


def _same(a: Record, b: Record) -> bool:
    same_acts = (a.acts is None and b.acts is None) or (
        a.acts is not None and b.acts is not None and torch.equal(a.acts, b.acts)
    )
    return (
        same_acts
        and a.score.to_dict() == b.score.to_dict()
        and a.generations == b.generations
        and a.indomain is b.indomain is None
    )


def _acts_file(store: RecordStore, key: str):
    meta = json.loads(store._paths(key)[1].read_text())
    return store.root / meta["acts_file"]


def test_records_round_trip_and_carry_their_checksums(tmp_path):
    store = RecordStore(tmp_path)
    rec, bare = _record(), _record("base@indomain:medical", with_acts=False)
    store.put(rec)
    store.put(bare)
    assert _same(store.get(rec.name), rec) and _same(store.get(bare.name), bare)
    meta = json.loads(store._paths(rec.name)[1].read_text())
    assert len(meta["acts_sha256"]) == 64 and len(meta["sha256"]) == 64
    assert (
        meta["acts_file"]
        == f"{store._paths(rec.name)[0].stem}.{meta['acts_sha256'][:16]}.safetensors"
    )
    assert store.get("never-stored") is None and store.has(rec.name)


def test_a_record_altered_to_hold_nan_is_refused_naming_its_file(tmp_path):
    store = RecordStore(tmp_path)
    rec = _record()
    store.put(rec)
    path = _acts_file(store, rec.name)
    acts = load_file(str(path))
    acts["acts"][0, 1, 2] = float("nan")
    save_file(acts, str(path))
    with pytest.raises(IntegrityError, match=rf"{path.name} does not match.*delete .*\.json"):
        store.get(rec.name)


def test_a_truncated_record_is_refused_naming_its_file(tmp_path):
    store = RecordStore(tmp_path)
    rec = _record()
    store.put(rec)
    path = _acts_file(store, rec.name)
    path.write_bytes(path.read_bytes()[:64])
    with pytest.raises(ValueError, match=rf"{path.name} does not match"):
        store.get(rec.name)
    j = store._paths(rec.name)[1]
    j.write_text(j.read_text()[:40])  # a truncated JSON
    with pytest.raises(ValueError, match=rf"{j.name} is unreadable.*re-run"):
        store.get(rec.name)
    j.unlink()  # the fix the message names: the record is then recomputed
    assert store.get(rec.name) is None


def test_an_edited_score_is_refused(tmp_path):
    store = RecordStore(tmp_path)
    rec = _record()
    store.put(rec)
    j = store._paths(rec.name)[1]
    meta = json.loads(j.read_text())
    meta["generations"] = ["edited"]
    j.write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match=rf"{j.name} does not match the checksum"):
        store.get(rec.name)


def test_records_of_the_older_layout_read_unverified_with_one_warning(tmp_path, caplog):
    store = RecordStore(tmp_path)
    recs = [_record("a", 0), _record("b", 1)]
    for r in recs:  # as the code before checksums wrote them
        t, j = store._paths(r.name)
        save_file({"acts": r.acts.contiguous()}, str(t))
        j.write_text(
            json.dumps({"score": r.score.to_dict(), "indomain": None, "generations": r.generations})
        )
    with caplog.at_level("WARNING", logger="mci_interp.analysis.records"):
        got = [store.get(r.name) for r in recs]
    assert all(_same(g, r) for g, r in zip(got, recs, strict=True))
    assert sum("unverified" in m.message for m in caplog.records) == 1
    # an old record holding a NaN is still refused
    t = store._paths("a")[0]
    save_file({"acts": torch.full((2, 2), float("nan"))}, str(t))
    with pytest.raises(IntegrityError, match=r"a\.safetensors holds 4 non-finite"):
        store.get("a")


def test_non_finite_activations_are_never_stored(tmp_path):
    store = RecordStore(tmp_path)
    rec = _record()
    rec.acts[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite activations.*nothing was stored"):
        store.put(rec)
    assert list(tmp_path.iterdir()) == []


def test_two_jobs_writing_one_record_leave_a_consistent_one(tmp_path, monkeypatch):
    """Job A writes its activations, job B (another GPU: other bytes) writes its whole record,
    then A writes its JSON: the JSON names A's file, which is intact, so the record reads back
    as A's. Under one shared file name, B's bytes would have met A's checksum."""
    import mci_interp.analysis.records as study

    a, b = _record(seed=0), _record(seed=1)
    store_a, store_b = RecordStore(tmp_path), RecordStore(tmp_path)
    real_write_json = study.write_json

    def interleaved(path, obj):  # A's JSON is written only after B's whole record
        monkeypatch.setattr(study, "write_json", real_write_json)
        store_b.put(b)
        assert _same(store_b.get(b.name), b)
        return real_write_json(path, obj)

    monkeypatch.setattr(study, "write_json", interleaved)
    store_a.put(a)
    assert _same(RecordStore(tmp_path).get(a.name), a)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # B's file is left, unreferenced
    assert not list(tmp_path.glob(".*"))  # no staging files left behind
