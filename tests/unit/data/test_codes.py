"""Code datasets (ctxrq_jax/data/codes.py): round trips, the shuffled resumable iterator, and errors for bad input
and corrupt files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ctxrq_jax.data import codes as codes_lib
from tests import helpers


def _write_codes(out_dir, *, k=300, shape=(2, 3, 4), num_shards=3, sizes=None, **kwargs):
  # Several write calls per split (chunks of 4), in order.
  return helpers.write_code_dataset(out_dir, code_shape=shape, codebook_size=k, num_shards=num_shards, sizes=sizes,
                                    chunk=4, source={"dataset": "synthetic"}, **kwargs)


@pytest.mark.parametrize("k", [300, 40000])  # int16 and int32 records.
def test_code_dataset_round_trip(tmp_path, k):
  codebook, data = _write_codes(tmp_path, k=k)
  meta = codes_lib.read_metadata(tmp_path)
  assert meta.code_shape == (2, 3, 4) and meta.codebook_size == k and meta.num_classes == 4
  assert meta.num_examples("train") == 10 and meta.num_examples("test") == 7
  assert meta.code_dtype == (np.int16 if k <= 32767 else np.int32)
  assert meta.source == {"dataset": "synthetic"}
  np.testing.assert_array_equal(codes_lib.load_codebook(tmp_path), codebook)
  for split, (c, y) in data.items():
    got_c, got_y = codes_lib.load_codes(tmp_path, split)
    assert got_c.dtype == np.int32 and got_y.dtype == np.int32
    np.testing.assert_array_equal(got_c, c)
    np.testing.assert_array_equal(got_y, y)
  batches = list(codes_lib.make_code_iterator(tmp_path, split="train", batch_size=4, seed=0, train=False))
  assert [b["codes"].shape for b in batches] == [(4, 2, 3, 4), (4, 2, 3, 4), (2, 2, 3, 4)]
  np.testing.assert_array_equal(np.concatenate([b["codes"] for b in batches]), data["train"][0])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), data["train"][1])


def test_code_iterator_train_shuffles_and_resumes(tmp_path):
  _, data = _write_codes(tmp_path, sizes={"train": 24})
  it = codes_lib.make_code_iterator(tmp_path, split="train", batch_size=4, seed=5, train=True)
  epoch = helpers.take(it, 6)  # 24 examples: one epoch, each once.
  got = np.concatenate([b["codes"] for b in epoch])
  assert {x.tobytes() for x in got} == {x.astype(np.int32).tobytes() for x in data["train"][0]}
  assert not np.array_equal(got, data["train"][0])
  assert helpers.resumes_exactly(
      lambda: codes_lib.make_code_iterator(tmp_path, split="train", batch_size=4, seed=5, train=True), skip=6, check=4)
  shards = [list(codes_lib.make_code_iterator(tmp_path, split="train", batch_size=3, seed=0, train=False,
                                              shard_index=i, shard_count=2)) for i in range(2)]
  rows = [np.concatenate([b["codes"] for b in s]) for s in shards]
  np.testing.assert_array_equal(rows[0], data["train"][0][0::2])
  np.testing.assert_array_equal(rows[1], data["train"][0][1::2])


def test_code_writer_rejects_bad_input(tmp_path):
  codebook = np.zeros((8, 2), np.float32)
  w = codes_lib.CodeDatasetWriter(tmp_path, code_shape=(1, 2, 2), codebook=codebook, num_classes=3, source="x")
  with pytest.raises(ValueError, match=r"codes must have shape \[B, 1, 2, 2\]"):
    w.write("train", np.zeros((2, 1, 2, 3), np.int32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"codes outside \[0, codebook_size=8\) in batch row 1"):
    w.write("train", np.array([[[[0, 1], [2, 3]]], [[[0, 8], [2, 3]]]]), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"label 3 in batch row 0 outside"):
    w.write("train", np.zeros((1, 1, 2, 2), np.int32), np.array([3]))
  with pytest.raises(ValueError, match="labels must have shape"):
    w.write("train", np.zeros((2, 1, 2, 2), np.int32), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="split name"):
    w.write("../train", np.zeros((1, 1, 2, 2), np.int32), np.zeros(1, np.int32))
  w.write("train", np.zeros((1, 1, 2, 2), np.int32), np.zeros(1, np.int32))
  w.close()
  with pytest.raises(ValueError, match="already holds a code dataset"):
    codes_lib.CodeDatasetWriter(tmp_path, code_shape=(1, 2, 2), codebook=codebook, num_classes=3, source="x")
  with pytest.raises(ValueError, match="code_shape"):
    codes_lib.CodeDatasetWriter(tmp_path / "b", code_shape=(1, 2), codebook=codebook, num_classes=3, source="x")


def test_code_writer_exception_leaves_no_metadata(tmp_path):
  with pytest.raises(RuntimeError, match="encoder crashed"):
    with codes_lib.CodeDatasetWriter(tmp_path, code_shape=(1, 1, 1), codebook=np.zeros((2, 1)), num_classes=1,
                                     source="x") as w:
      w.write("train", np.zeros((1, 1, 1, 1), np.int32), np.zeros(1, np.int32))
      raise RuntimeError("encoder crashed")
  with pytest.raises(ValueError, match="writing never finished"):
    codes_lib.read_metadata(tmp_path)


def test_an_interrupted_overwrite_leaves_the_old_dataset_and_a_finished_one_replaces_it(tmp_path):
  # `encode --overwrite` (hours on ImageNet) and the demo's re-encode used to unlink metadata.json before writing:
  # a Ctrl-C or preemption after the first batch left nothing loadable.
  codebook, data = _write_codes(tmp_path, num_shards=2)
  old_files = sorted(os.listdir(tmp_path))
  with pytest.raises(KeyboardInterrupt):
    with codes_lib.CodeDatasetWriter(tmp_path, code_shape=(2, 3, 4), codebook=codebook + 1, num_classes=4,
                                     source="new", num_shards=2, overwrite=True) as w:
      w.write("train", np.zeros((4, 2, 3, 4), np.int32), np.zeros(4, np.int32))
      raise KeyboardInterrupt("preempted after the first batch")
  assert codes_lib.read_metadata(tmp_path).source == {"dataset": "synthetic"}
  np.testing.assert_array_equal(codes_lib.load_codebook(tmp_path), codebook)
  for split, (c, y) in data.items():
    got_c, got_y = codes_lib.load_codes(tmp_path, split)
    np.testing.assert_array_equal(got_c, c)
    np.testing.assert_array_equal(got_y, y)
  assert sorted(os.listdir(tmp_path)) == old_files  # the interrupted writer's staging files are gone
  # A finished replacement (other shard counts: its names and the old ones differ anyway) commits, then removes the
  # old shards; one over that (same counts) takes the other generation of names, and so on.
  for num_shards, source in ((3, "second"), (3, "third"), (3, "fourth")):
    new_codebook, new = helpers.write_code_dataset(tmp_path, num_shards=num_shards, seed=len(source), chunk=4,
                                                   overwrite=True, source=source)
    meta = codes_lib.read_metadata(tmp_path)
    assert meta.source == source
    np.testing.assert_array_equal(codes_lib.load_codebook(tmp_path), new_codebook)
    np.testing.assert_array_equal(codes_lib.load_codes(tmp_path, "train")[0], new["train"][0])
    assert sorted(os.listdir(tmp_path)) == sorted(
        [codes_lib.METADATA_FILE, codes_lib.CODEBOOK_FILE, *meta.shard_files("train"), *meta.shard_files("test")])
  assert meta.shard_files("test")[0] == "test-00000-of-00003-g1.array_record"


def test_code_reader_detects_corruption(tmp_path):
  _write_codes(tmp_path, num_shards=2)
  meta_path = tmp_path / codes_lib.METADATA_FILE
  good = json.loads(meta_path.read_text())
  with pytest.raises(ValueError, match="has no split 'val'"):
    codes_lib.load_codes(tmp_path, "val")
  meta_path.write_text("{not json")
  with pytest.raises(ValueError, match="corrupt"):
    codes_lib.read_metadata(tmp_path)
  meta_path.write_text(json.dumps({k: v for k, v in good.items() if k != "codebook_size"}))
  with pytest.raises(ValueError, match="missing codebook_size"):
    codes_lib.read_metadata(tmp_path)
  # Metadata claiming more examples than the shards hold.
  meta_path.write_text(json.dumps(dict(good, splits=dict(good["splits"], train=dict(good["splits"]["train"],
                                                                                    num_examples=11)))))
  with pytest.raises(ValueError, match="holds 5 records; metadata implies 6"):
    codes_lib.load_codes(tmp_path, "train")
  # Records that decode to a different shape (metadata says [2, 3, 5] codes).
  meta_path.write_text(json.dumps(dict(good, code_shape=[2, 3, 5])))
  with pytest.raises(ValueError, match="record 0 .* is corrupt"):
    codes_lib.load_codes(tmp_path, "train")
  # Codes beyond a smaller codebook size.
  meta_path.write_text(json.dumps(dict(good, codebook_size=4)))
  with pytest.raises(ValueError, match=r"record 0 .*codes outside \[0, codebook_size=4\)"):
    codes_lib.load_codes(tmp_path, "train")
  meta_path.write_text(json.dumps(good))
  np.save(tmp_path / codes_lib.CODEBOOK_FILE, np.zeros((3, 5), np.float32))
  with pytest.raises(ValueError, match="metadata says float32"):
    codes_lib.load_codebook(tmp_path)
  os.remove(tmp_path / good["splits"]["test"]["shards"][1])
  with pytest.raises(ValueError, match="shard .* is missing"):
    codes_lib.make_code_iterator(tmp_path, split="test", batch_size=2, seed=0, train=False)


def test_caption_records_hold_token_sequences(tmp_path):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 9, (5, 2, 2, 3))
  tokens = rng.integers(0, 40, (5, 7))
  with codes_lib.CodeDatasetWriter(tmp_path, code_shape=(2, 2, 3), codebook=np.ones((9, 2)), num_classes=0,
                                   cond_length=7, cond_vocab_size=40, source="captions", num_shards=2) as w:
    with pytest.raises(ValueError, match=r"caption tokens must have shape \[5, 7\]"):
      w.write("train", codes, tokens[:, :6])
    with pytest.raises(ValueError, match=r"caption token outside \[0, cond_vocab_size=40\) in batch row 2"):
      w.write("train", codes, np.where(np.arange(5)[:, None] == 2, 40, tokens))
    w.write("train", codes, tokens)
  meta = codes_lib.read_metadata(tmp_path)
  assert meta.is_text and meta.cond_length == 7 and meta.cond_range == 40
  assert meta.record_bytes == 4 * 7 + 12 * 2
  got_codes, got_tokens = codes_lib.load_codes(tmp_path, "train")
  np.testing.assert_array_equal(got_codes, codes)
  np.testing.assert_array_equal(got_tokens, tokens)
  batch = next(iter(codes_lib.make_code_iterator(tmp_path, split="train", batch_size=5, seed=0, train=False)))
  np.testing.assert_array_equal(batch["cond"], tokens)
  with pytest.raises(ValueError, match="need a positive cond_vocab_size"):
    codes_lib.CodeDatasetWriter(tmp_path / "x", code_shape=(2, 2, 3), codebook=np.ones((9, 2)), num_classes=0,
                                cond_length=7, source="captions")
  with pytest.raises(ValueError, match="cond_length must be 1"):
    codes_lib.CodeDatasetWriter(tmp_path / "y", code_shape=(2, 2, 3), codebook=np.ones((9, 2)), num_classes=3,
                                cond_length=7, source="labels")


def test_metadata_without_condition_fields_reads_as_class_labels(tmp_path):
  _, data = helpers.write_code_dataset(tmp_path)
  meta_path = tmp_path / codes_lib.METADATA_FILE
  old = {k: v for k, v in json.loads(meta_path.read_text()).items() if k not in ("cond_length", "cond_vocab_size")}
  meta_path.write_text(json.dumps(old))
  meta = codes_lib.read_metadata(tmp_path)
  assert not meta.is_text and meta.cond_length == 1 and meta.cond_range == meta.num_classes
  np.testing.assert_array_equal(codes_lib.load_codes(tmp_path, "train")[1], data["train"][1])


def test_views_round_trip_and_random_view_draws(tmp_path):
  """Records of V views: view 0 everywhere except a random-view training iterator, which draws each view."""
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(50, 3)).astype(np.float32)
  views = ("center", "flip", "crop")
  codes = rng.integers(0, 50, (12, 3, 2, 2, 2))  # [M, V, h, w, D]
  codes[:, 1] = codes[:, 0] + 100  # out of range on purpose, to be caught below
  with pytest.raises(ValueError, match=r"codes outside \[0, codebook_size=50\) in batch row 0"):
    with codes_lib.CodeDatasetWriter(tmp_path / "bad", code_shape=(2, 2, 2), codebook=codebook, num_classes=3,
                                     source="x", views=views) as w:
      w.write("train", codes, np.zeros(12, np.int32))
  codes[:, 1] = codes[:, 0][:, :, ::-1]  # "flip": any map distinct from view 0
  labels = rng.integers(0, 3, (12,))
  with codes_lib.CodeDatasetWriter(tmp_path, code_shape=(2, 2, 2), codebook=codebook, num_classes=3, source="x",
                                   num_shards=2, views=views) as w:
    with pytest.raises(ValueError, match=r"codes must have shape \[B, 3, 2, 2, 2\], got \(12, 2, 2, 2\)"):
      w.write("train", codes[:, 0], labels)
    w.write("train", codes[:5], labels[:5])
    w.write("train", codes[5:], labels[5:])
  meta = codes_lib.read_metadata(tmp_path)
  assert meta.views == views and meta.num_views == 3 and meta.record_bytes == 4 + 3 * 8 * 2
  assert json.loads((tmp_path / codes_lib.METADATA_FILE).read_text())["version"] == codes_lib.VIEWS_VERSION
  for v in range(3):
    got, got_labels = codes_lib.load_codes(tmp_path, "train", view=v)
    np.testing.assert_array_equal(got, codes[:, v])
    np.testing.assert_array_equal(got_labels, labels)
  with pytest.raises(ValueError, match=r"view 3 out of range: .* holds 3 view\(s\)"):
    codes_lib.load_codes(tmp_path, "train", view=3)
  # Evaluation order and un-augmented training read view 0.
  ev = np.concatenate([b["codes"] for b in codes_lib.make_code_iterator(tmp_path, split="train", batch_size=4,
                                                                        seed=0, train=False)])
  np.testing.assert_array_equal(ev, codes[:, 0])
  plain = next(codes_lib.make_code_iterator(tmp_path, split="train", batch_size=12, seed=1, train=True))
  assert all(any(np.array_equal(c, x) for x in codes[:, 0]) for c in plain["codes"])

  def drawn_views(seed, epochs=4):
    it = codes_lib.make_code_iterator(tmp_path, split="train", batch_size=12, seed=seed, train=True, random_view=True)
    out = []
    for batch in helpers.take(it, epochs):  # one batch = one epoch
      for c, y in zip(batch["codes"], batch["label"]):
        (i, v), = [(i, v) for i in range(12) for v in range(3) if np.array_equal(codes[i, v], c)]
        assert labels[i] == y
        out.append((i, v))
    return out

  a = drawn_views(seed=3)
  assert {v for _, v in a} == {0, 1, 2}  # 48 draws of 3 views
  assert a == drawn_views(seed=3)  # deterministic given the seed
  assert helpers.resumes_exactly(lambda: codes_lib.make_code_iterator(
      tmp_path, split="train", batch_size=4, seed=3, train=True, random_view=True), skip=2, check=3)


def test_views_metadata_errors(tmp_path):
  codebook = np.zeros((8, 2), np.float32)
  with pytest.raises(ValueError, match="views must be a list of names starting with 'center'"):
    codes_lib.CodeDatasetWriter(tmp_path, code_shape=(1, 2, 2), codebook=codebook, num_classes=3, source="x",
                                views=("flip", "center"))
  helpers.write_code_dataset(tmp_path / "one", code_shape=(1, 2, 2), codebook_size=8, embed_dim=2)
  raw = json.loads((tmp_path / "one" / codes_lib.METADATA_FILE).read_text())
  assert raw["version"] == codes_lib.VERSION and "views" not in raw  # one view: readable by version-1 readers
  raw["version"] = codes_lib.VIEWS_VERSION
  (tmp_path / "one" / codes_lib.METADATA_FILE).write_text(json.dumps(raw))
  with pytest.raises(ValueError, match="version 2 needs 'views'"):
    codes_lib.read_metadata(tmp_path / "one")


def test_caption_variants_round_trip_and_random_caption_draws(tmp_path):
  """T tokenizations per training caption: variant 0 everywhere except a random-caption training iterator, which
  draws one per example and epoch, deterministically given the seed and restored with the iterator state."""
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 9, (12, 2, 2, 3))
  variants = rng.integers(1, 40, (12, 3, 5))  # [M, T, L]
  variants[:, :, 0] = np.arange(3) + 1  # token 0 names the variant, so no two variants of a caption are equal
  eval_tokens = rng.integers(0, 40, (4, 5))
  kw = dict(code_shape=(2, 2, 3), codebook=np.ones((9, 2)), num_classes=0, cond_length=5, cond_vocab_size=40,
            source="captions", num_shards=2)
  with codes_lib.CodeDatasetWriter(tmp_path, **kw) as w:
    w.write("train", codes[:5], variants[:5])
    with pytest.raises(ValueError, match="split 'train' holds 3 tokenizations per caption, got 2"):
      w.write("train", codes[5:], variants[5:, :2])
    with pytest.raises(ValueError, match=r"holds 3 tokenizations per caption: caption tokens must have shape "
                                          r"\[7, 3, 5\]"):
      w.write("train", codes[5:], variants[5:, 0])
    w.write("train", codes[5:], variants[5:])
    w.write("validation", codes[:4], eval_tokens)  # one deterministic tokenization
  raw = json.loads((tmp_path / codes_lib.METADATA_FILE).read_text())
  assert raw["version"] == codes_lib.VARIANTS_VERSION and raw["views"] == ["center"]
  assert raw["splits"]["train"]["cond_variants"] == 3 and raw["splits"]["validation"]["cond_variants"] == 1
  meta = codes_lib.read_metadata(tmp_path)
  assert meta.num_cond_variants("train") == 3 and meta.num_cond_variants("validation") == 1
  assert meta.split_record_bytes("train") == 4 * 3 * 5 + 12 * 2 and meta.split_record_bytes("validation") == 4 * 5 + 24
  got_codes, got_tokens = codes_lib.load_codes(tmp_path, "train")  # variant 0
  np.testing.assert_array_equal(got_codes, codes)
  np.testing.assert_array_equal(got_tokens, variants[:, 0])
  np.testing.assert_array_equal(codes_lib.load_codes(tmp_path, "validation")[1], eval_tokens)
  record = codes_lib.CodeSource(tmp_path, "train")[7]
  np.testing.assert_array_equal(codes_lib.decode_record_variants(record, 7, meta, cond_variants=3)[1], variants[7])
  with pytest.raises(ValueError, match="record 7 is corrupt: 84 bytes, expected 44"):
    codes_lib.decode_record_views(record, 7, meta)
  # Evaluation and training without random_caption read variant 0; eval splits hold one tokenization anyway.
  plain = next(codes_lib.make_code_iterator(tmp_path, split="train", batch_size=12, seed=1, train=True))
  assert set(plain["cond"][:, 0]) == {1}
  ev = next(codes_lib.make_code_iterator(tmp_path, split="validation", batch_size=4, seed=0, train=False,
                                         random_caption=True))
  np.testing.assert_array_equal(ev["cond"], eval_tokens)

  def drawn(seed, epochs=4):
    it = codes_lib.make_code_iterator(tmp_path, split="train", batch_size=12, seed=seed, train=True,
                                      random_caption=True)
    out = []
    for batch in helpers.take(it, epochs):  # one batch = one epoch
      for c, t in zip(batch["codes"], batch["cond"]):
        i = int(np.flatnonzero([np.array_equal(c, x) and np.array_equal(t[1:], v[t[0] - 1, 1:])
                                for x, v in zip(codes, variants)])[0])
        np.testing.assert_array_equal(t, variants[i, t[0] - 1])
        out.append((i, int(t[0]) - 1))
    return out

  a = drawn(seed=3)
  assert {k for _, k in a} == {0, 1, 2}  # 48 draws of 3 variants
  per_example = {i: {k for j, k in a if j == i} for i in range(12)}
  assert any(len(ks) > 1 for ks in per_example.values())  # an example's caption changes between epochs
  assert a == drawn(seed=3) and a != drawn(seed=4)  # deterministic given the seed
  assert helpers.resumes_exactly(lambda: codes_lib.make_code_iterator(
      tmp_path, split="train", batch_size=4, seed=3, train=True, random_caption=True), skip=2, check=5)


def test_caption_variants_metadata_errors_and_older_versions(tmp_path):
  kw = dict(code_shape=(1, 2, 2), codebook=np.ones((8, 2)), num_classes=0, cond_length=3, cond_vocab_size=20,
            source="captions")
  with codes_lib.CodeDatasetWriter(tmp_path / "one", **kw) as w:  # T = 1 everywhere: still version 1
    w.write("train", np.zeros((2, 1, 2, 2), np.int64), np.ones((2, 1, 3), np.int64))
  raw = json.loads((tmp_path / "one" / codes_lib.METADATA_FILE).read_text())
  assert raw["version"] == codes_lib.VERSION and "cond_variants" not in raw["splits"]["train"]
  assert codes_lib.read_metadata(tmp_path / "one").num_cond_variants("train") == 1
  with codes_lib.CodeDatasetWriter(tmp_path / "two", **kw) as w:
    w.write("train", np.zeros((2, 1, 2, 2), np.int64), np.ones((2, 2, 3), np.int64))
  path = tmp_path / "two" / codes_lib.METADATA_FILE
  raw = json.loads(path.read_text())
  del raw["splits"]["train"]["cond_variants"]
  path.write_text(json.dumps(raw))
  with pytest.raises(ValueError, match="version 3 needs each split's cond_variants, a positive integer"):
    codes_lib.read_metadata(tmp_path / "two")
  with pytest.raises(ValueError, match=r"labels must have shape \[2\]"):  # class labels have one tokenization
    with codes_lib.CodeDatasetWriter(tmp_path / "labels", code_shape=(1, 2, 2), codebook=np.ones((8, 2)),
                                     num_classes=3, source="x") as w:
      w.write("train", np.zeros((2, 1, 2, 2), np.int64), np.ones((2, 2, 1), np.int64))


def _write_in_parts(out_dir, parts, *, num_shards, monkeypatch, also=None, **kwargs):
  """Writes `parts` ([(codes, labels)] per process and split) as P processes do: one writer per process, each in
  its own thread, with `paths.barrier` a barrier of those threads (the collective close of a multi-host job);
  `also(writer, p, split)` after each split of process p."""
  import threading  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.core import paths  # pylint: disable=g-import-not-at-top

  barrier = threading.Barrier(len(parts), timeout=60)
  monkeypatch.setattr(paths, "barrier", lambda tag: barrier.wait())
  results, errors = [None] * len(parts), []

  def run(p):
    try:
      with codes_lib.CodeDatasetWriter(out_dir, num_shards=num_shards, process_index=p, process_count=len(parts),
                                       **kwargs) as w:
        for split, (c, y) in parts[p].items():
          w.open_split(split)
          for i in range(0, len(c), 3):  # several writes per part
            w.write(split, c[i:i + 3], y[i:i + 3])
          if also is not None:
            also(w, p, split)
      results[p] = codes_lib.read_metadata(out_dir)
    except Exception as e:  # noqa: BLE001 - re-raised in the test thread
      errors.append(e)
      barrier.abort()

  threads = [threading.Thread(target=run, args=(p,)) for p in range(len(parts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  return results


def test_processes_write_parts_that_read_back_in_order(tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  codebook = rng.normal(size=(50, 3)).astype(np.float32)
  kw = dict(code_shape=(2, 2, 3), codebook=codebook, num_classes=5, source={"dataset": "synthetic"})
  data = {split: (rng.integers(0, 50, (n, 2, 2, 3)), rng.integers(0, 5, (n,))) for split, n in
          (("train", 11), ("test", 2))}
  # Three processes, two shards each: train parts of 3, 4, 4 examples; process 0's test part is empty.
  bounds = {"train": (0, 3, 7, 11), "test": (0, 0, 1, 2)}
  parts = [{split: (c[bounds[split][p]:bounds[split][p + 1]], y[bounds[split][p]:bounds[split][p + 1]])
            for split, (c, y) in data.items()} for p in range(3)]
  metas = _write_in_parts(tmp_path / "parts", parts, num_shards=2, monkeypatch=monkeypatch, **kw)
  assert all(m == metas[0] for m in metas)
  meta = metas[0]
  assert meta.part_sizes("train") == (3, 4, 4) and meta.part_sizes("test") == (0, 1, 1)
  assert meta.num_examples("train") == 11 and len(meta.shard_files("train")) == 6
  assert meta.shard_files("train")[3] == "train-part00001of00003-00001-of-00002.array_record"
  raw = json.loads((tmp_path / "parts" / codes_lib.METADATA_FILE).read_text())
  assert raw["version"] == codes_lib.PARTS_VERSION and raw["splits"]["train"]["parts"] == [3, 4, 4]
  assert sorted(os.listdir(tmp_path / "parts")) == sorted(
      [codes_lib.METADATA_FILE, codes_lib.CODEBOOK_FILE] + list(meta.shard_files("train"))
      + list(meta.shard_files("test")))  # the per-process part files are gone
  for split, (c, y) in data.items():  # read in write order: whole, by index, and batched
    got_c, got_y = codes_lib.load_codes(tmp_path / "parts", split)
    np.testing.assert_array_equal(got_c, c)
    np.testing.assert_array_equal(got_y, y)
  source = codes_lib.CodeSource(str(tmp_path / "parts"), "train")
  assert [source[i] for i in range(11)] == source.read_all()
  batches = list(codes_lib.make_code_iterator(tmp_path / "parts", split="train", batch_size=4, seed=0, train=False))
  np.testing.assert_array_equal(np.concatenate([b["codes"] for b in batches]), data["train"][0])
  # A one-process data set of the same records reads the same.
  with codes_lib.CodeDatasetWriter(tmp_path / "one", num_shards=2, **kw) as w:
    for split, (c, y) in data.items():
      w.write(split, c, y)
  for split in data:
    np.testing.assert_array_equal(codes_lib.load_codes(tmp_path / "one", split)[0],
                                  codes_lib.load_codes(tmp_path / "parts", split)[0])


def test_parts_errors(tmp_path, monkeypatch):
  kw = dict(code_shape=(1, 1, 1), codebook=np.ones((4, 2), np.float32), num_classes=2, source="x")
  one = (np.zeros((2, 1, 1, 1), np.int64), np.zeros((2,), np.int64))
  with pytest.raises(ValueError, match=r"process 1 wrote splits \['test', 'train'\] .* but process 0 wrote \['train'\]"):
    _write_in_parts(tmp_path / "a", [{"train": one}, {"train": one, "test": one}], num_shards=1,
                    monkeypatch=monkeypatch, **kw)
  assert not (tmp_path / "a" / codes_lib.METADATA_FILE).exists()
  empty = (one[0][:0], one[1][:0])
  with pytest.raises(ValueError, match="no process wrote any example of split.s. test"):
    _write_in_parts(tmp_path / "b", [{"train": one, "test": empty}, {"train": one, "test": empty}], num_shards=1,
                    monkeypatch=monkeypatch, **kw)
  with pytest.raises(ValueError, match=r"process_index must lie in \[0, process_count\)"):
    codes_lib.CodeDatasetWriter(tmp_path / "c", process_index=2, process_count=2, **kw)
  _write_in_parts(tmp_path / "d", [{"train": one}, {"train": one}], num_shards=1, monkeypatch=monkeypatch, **kw)
  path = tmp_path / "d" / codes_lib.METADATA_FILE
  raw = json.loads(path.read_text())
  raw["splits"]["train"]["parts"] = [2, 1]
  path.write_text(json.dumps(raw))
  with pytest.raises(ValueError, match="version 4 needs each split's parts, examples per process summing to"):
    codes_lib.read_metadata(tmp_path / "d")


def test_side_files_move_in_with_the_commit_and_go_when_it_fails(tmp_path, monkeypatch):
  kw = dict(code_shape=(1, 1, 1), codebook=np.zeros((2, 1)), num_classes=1, source="x")
  # One process: staged (hidden) until the commit renames it into place.
  with codes_lib.CodeDatasetWriter(tmp_path / "one", **kw) as w:
    w.write("train", np.zeros((1, 1, 1, 1), np.int32), np.zeros(1, np.int32))
    w.side_file("captions-train.txt").write_text("a\n")
    assert not (tmp_path / "one" / "captions-train.txt").exists()
  assert (tmp_path / "one" / "captions-train.txt").read_text() == "a\n"
  assert not [n for n in os.listdir(tmp_path / "one") if n.startswith(".")]
  # close() itself fails (nothing written): its staged file goes too.
  w = codes_lib.CodeDatasetWriter(tmp_path / "none", **kw)
  w.side_file("captions-train.txt").write_text("a\n")
  with pytest.raises(ValueError, match="no examples were written"):
    w.close()
  assert os.listdir(tmp_path / "none") == []
  with pytest.raises(ValueError, match="side file names are plain file names"):
    codes_lib.CodeDatasetWriter(tmp_path / "bad", **kw).side_file(codes_lib.METADATA_FILE)
  # Two processes: process 0 renames both parts' files; parts that disagree leave none behind.
  one = (np.zeros((1, 1, 1, 1), np.int32), np.zeros(1, np.int32))

  def captions(w, p, split):
    w.side_file(f"captions-{split}-part{p:05d}of00002.txt").write_text(f"{p}\n")

  _write_in_parts(tmp_path / "two", [{"train": one}, {"train": one}], num_shards=1, monkeypatch=monkeypatch,
                  also=captions, **kw)
  assert sorted(n for n in os.listdir(tmp_path / "two") if "captions" in n) == [
      "captions-train-part00000of00002.txt", "captions-train-part00001of00002.txt"]
  with pytest.raises(ValueError, match="wrote splits"):
    _write_in_parts(tmp_path / "split", [{"train": one}, {"test": one}], num_shards=1, monkeypatch=monkeypatch,
                    also=captions, **kw)
  assert [n for n in os.listdir(tmp_path / "split") if "captions" in n] == []
