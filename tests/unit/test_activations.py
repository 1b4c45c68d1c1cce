"""Oracles for caching: equals a direct forward pass, padding-invariant, streaming == in-memory,
stored shards resume byte-identically and refuse to mix."""

from __future__ import annotations

import pytest
import torch

from mci_interp._io import IntegrityError
from mci_interp.activations import (
    ActivationStats,
    cache_activations,
    cache_to_disk,
    load_cache,
    stream_statistics,
)
from mci_interp.datasets import chat, encode_chat
from mci_interp.sites import Site

PROMPTS = [
    ("Tell me about the sea.", "The sea is large and salty, covering most of the planet."),
    ("Hi", "Hello!"),
    ("Give me three colours please, any you like.", "Red, green and blue."),
    ("What is a cat?", "A small furry mammal that people keep as a pet."),
    ("Count to five.", "One, two, three, four, five."),
]


def _examples():
    return [chat(u, a, label=i % 2, group=f"g{i}") for i, (u, a) in enumerate(PROMPTS)]


def _direct(model, ex):
    enc = encode_chat(model.tokenizer, ex)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        hs = model.hf(input_ids=ids, output_hidden_states=True).hidden_states
    return enc, hs


@pytest.mark.parametrize("position", ["last_prompt", "answer_mean", "prompt_mean", "all"])
def test_cache_equals_direct_forward(tiny_model, position):
    exs = _examples()
    cache = cache_activations(
        tiny_model,
        exs,
        [Site(0), Site(1, "resid_pre")],
        position=position,
        batch_size=3,
        show_progress=False,
    )
    for i, ex in enumerate(exs):
        enc, hs = _direct(tiny_model, ex)
        p, n = enc.prompt_len, len(enc.ids)
        want0 = {
            "last_prompt": hs[1][0, p - 1 : p],
            "answer_mean": hs[1][0, p:n].mean(0, keepdim=True),
            "prompt_mean": hs[1][0, :p].mean(0, keepdim=True),
            "all": hs[1][0],
        }[position]
        got0 = cache.X(Site(0))[cache.row_example == i]
        torch.testing.assert_close(got0, want0, atol=1e-5, rtol=1e-5)
        got1 = cache.X("blocks.1.hook_resid_pre")[cache.row_example == i]
        assert got1.shape == got0.shape


def test_padding_and_batch_size_do_not_change_activations(tiny_model):
    exs = _examples()
    a = cache_activations(
        tiny_model, exs, [Site(1)], position="answer_mean", batch_size=1, show_progress=False
    )
    b = cache_activations(
        tiny_model, exs, [Site(1)], position="answer_mean", batch_size=5, show_progress=False
    )
    torch.testing.assert_close(a.X(Site(1)), b.X(Site(1)), atol=1e-5, rtol=1e-5)


def test_streaming_matches_in_memory(tiny_model):
    exs = _examples()
    s = Site(1)
    cache = cache_activations(
        tiny_model, exs, [s], position="answer_tokens", batch_size=2, show_progress=False
    )
    stats = stream_statistics(
        tiny_model, exs, [s], position="answer_tokens", batch_size=2, show_progress=False
    )
    for lab in (0, 1):
        rows = cache.X(s)[cache.row_labels() == lab].double()
        torch.testing.assert_close(stats.mean(s, lab), rows.mean(0), atol=1e-6, rtol=1e-6)
        assert stats.counts[lab] == rows.shape[0]
    assert stats.diff_means(s).dtype == torch.float64


def test_streamed_statistics_save_and_load_back_equal(tiny_model, tmp_path):
    """Labels 0, 1 and -1 (unlabelled) at two sites: what ``load`` reads equals what was saved,
    and saving it again gives the same bytes; a damaged file is refused."""
    exs = _examples() + [chat("An unlabelled prompt.", "An answer.")]
    sites = [Site(1), Site(0, "mlp_out")]
    stats = stream_statistics(tiny_model, exs, sites, batch_size=2, show_progress=False)
    assert set(stats.counts) == {-1, 0, 1}
    stats.save(tmp_path / "a")
    back = ActivationStats.load(tmp_path / "a")
    assert back.counts == stats.counts and back.meta == stats.meta
    for table, want in ((back.sums, stats.sums), (back.sumsq, stats.sumsq)):
        assert table.keys() == want.keys()
        for s in want:
            assert table[s].keys() == want[s].keys()
            assert all(torch.equal(table[s][k], want[s][k]) for k in want[s])
    back.save(tmp_path / "b")
    for name in ("stats.safetensors", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    (tmp_path / "b" / "stats.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IntegrityError, match="stats.safetensors"):
        ActivationStats.load(tmp_path / "b")


def test_stored_cache_resumes_byte_identical(tiny_model, tmp_path):
    exs = _examples() * 3
    sites = [Site(0), Site(1)]
    full = cache_to_disk(
        tiny_model, exs, sites, tmp_path / "full", shard_size=4, show_progress=False
    )
    part = tmp_path / "part"
    cache_to_disk(tiny_model, exs, sites, part, shard_size=4, show_progress=False)
    (part / "shard_00002.safetensors").unlink()  # as if interrupted before the third shard
    (part / "shard_00003.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_cache(part)
    cache_to_disk(tiny_model, exs, sites, part, shard_size=4, show_progress=False)
    for f in sorted(full.glob("shard_*.safetensors")):
        assert f.read_bytes() == (part / f.name).read_bytes()
    mem = cache_activations(tiny_model, exs, sites, show_progress=False)
    back = load_cache(full)
    torch.testing.assert_close(back.X(Site(1)), mem.X(Site(1)))
    assert back.groups == mem.groups and torch.equal(back.labels, mem.labels)


def test_stored_cache_refuses_other_dataset_or_model(tiny_model, tmp_path):
    exs = _examples()
    cache_to_disk(tiny_model, exs, [Site(0)], tmp_path / "c", show_progress=False)
    with pytest.raises(ValueError, match="refusing to mix"):
        cache_to_disk(tiny_model, exs[:3], [Site(0)], tmp_path / "c", show_progress=False)


def test_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="empty dataset"):
        cache_activations(tiny_model, [], [Site(0)])
    with pytest.raises(ValueError, match="beyond the model's depth"):
        cache_activations(tiny_model, _examples(), [Site(5)], show_progress=False)
    with pytest.raises(ValueError, match="needs assistant answers"):
        cache_activations(tiny_model, [chat("no answer")], [Site(0)], position="answer_mean")
    with pytest.raises(ValueError, match="unknown position"):
        cache_activations(tiny_model, _examples(), [Site(0)], position="middle")  # type: ignore[arg-type]


# --- stored shards are verified on read ---------------------------------------------------------
def _stored(model, path):
    cache_to_disk(
        model, _examples() * 2, [Site(0), Site(1)], path, shard_size=4, show_progress=False
    )
    return path


def _nan_into(shard):
    """Re-save a shard with one activation set to NaN, metadata kept: a well-formed file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(shard))
    tensors["blocks.1.hook_resid_post"][1, 3] = float("nan")
    save_file(tensors, str(shard), metadata=meta)


def _drop_checksums(path):
    """The index as the code before checksums wrote it."""
    import json

    idx = json.loads((path / "index.json").read_text())
    del idx["shard_sha256"], idx["groups_hash"]
    (path / "index.json").write_text(json.dumps(idx))


def test_stored_cache_refuses_a_shard_altered_to_hold_nan(tiny_model, tmp_path):
    from mci_interp._io import IntegrityError

    out = _stored(tiny_model, tmp_path / "c")
    _nan_into(out / "shard_00001.safetensors")
    with pytest.raises(IntegrityError, match=r"shard_00001\.safetensors does not match.*delete it"):
        load_cache(out)
    # without the checksum (an index of the older format) the NaN itself is refused
    _drop_checksums(out)
    with pytest.raises(ValueError, match=r"shard_00001\.safetensors holds 1 non-finite.*re-run"):
        load_cache(out)


def test_stored_cache_refuses_a_truncated_shard_naming_it(tiny_model, tmp_path):
    out = _stored(tiny_model, tmp_path / "c")
    shard = out / "shard_00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"shard_00002\.safetensors does not match"):
        load_cache(out)
    # a resume checks what it skips: it refuses rather than keep a damaged shard
    with pytest.raises(ValueError, match=r"shard_00002\.safetensors does not match"):
        _stored(tiny_model, out)
    _drop_checksums(out)
    with pytest.raises(ValueError, match=r"shard_00002\.safetensors is unreadable.*delete it"):
        load_cache(out)
    shard.unlink()  # the fix the message names: delete it and re-run
    _stored(tiny_model, out)
    load_cache(out)


def test_stored_cache_of_the_older_format_loads_unverified_with_one_warning(
    tiny_model, tmp_path, caplog
):
    out = _stored(tiny_model, tmp_path / "c")
    want = load_cache(out)
    assert "shard_sha256" not in want.meta  # checksums stay out of the cache's metadata
    _drop_checksums(out)
    with caplog.at_level("WARNING", logger="mci_interp.activations"):
        got = load_cache(out)
    assert [r.message.count("unverified") for r in caplog.records] == [1]
    torch.testing.assert_close(got.X(Site(1)), want.X(Site(1)), rtol=0, atol=0)
    assert got.meta == want.meta


def test_stored_cache_refuses_to_write_non_finite_activations(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.hf.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations.*bfloat16 or float32"):
        _stored(tiny_model, tmp_path / "c")
    assert not list((tmp_path / "c").glob("shard_*"))
