"""Draft-and-Revise sampling from a loaded stage-2 run: batched, sharded over the devices, written as PNG grids and an
FID-ready .npz. The command is ctxrq_jax/sample.py.

Outputs (`write_outputs`):
  samples.png      the final samples, one row per class (a preview: preview_per_class x preview_classes)
  phases.png       the draft and every revision side by side (one panel per phase, the preview's samples)
  samples.npz      arr_0: uint8 [M, H, W, 3] final images (the layout FID/IS/precision-recall evaluators read),
                   labels: int32 [M], codes: int32 [M, h, w, D]
  samples.json     written after the npz by the `sample` command and the recipes (SETTINGS_FILE, `settings_record`):
                   the run, step, checkpoint and settings that drew it. Replacing a samples.npz removes the files
                   that described the one before (`stale_results`: that samples.json and `evaluate fid` /
                   `evaluate clip`'s samples.fid.json / samples.clip.json) just before the new file is renamed into
                   place, so none of them outlives its sample set.
On several hosts each writes its block of the sample indices to shards/samples-<host>-of-<hosts>.npz and
`merge_shards` joins them into one samples.npz, equal to the one a single host writes (sample i's random numbers
depend on the seed and i only; see `sample_codes`).

Text-to-image runs (`sample_prompts`) write the same files with one row per prompt and the prompt written under
each image in both grids; `labels` is then the prompt index of each sample, and the npz adds `prompts` (str [P])
and `cond` (int32 [M, L], the caption tokens).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctxrq_jax.core import grids
from ctxrq_jax.core import host
from ctxrq_jax.core import paths as fs
from ctxrq_jax.core import reporting
from ctxrq_jax.core import sharding
from ctxrq_jax.sampling import decoder
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import logits

log = logging.getLogger(__name__)


def parse_classes(spec: str, num_classes: int) -> list[int]:
  """'all' or a comma list of class ids -> ids, each checked to lie in [0, num_classes)."""
  if spec.strip() == "all":
    return list(range(num_classes))
  try:
    ids = [int(s) for s in spec.split(",") if s.strip()]
  except ValueError as e:
    raise ValueError(f"--classes must be 'all' or comma-separated integers, got {spec!r}") from e
  bad = [c for c in ids if not 0 <= c < num_classes]
  if bad or not ids:
    raise ValueError(f"class ids {bad or spec!r} are outside [0, {num_classes}) for this model")
  return ids


def sample_keys(rng: jax.Array, indices: np.ndarray) -> jax.Array:
  """One key per sample: fold_in(rng, index) for each global sample index [S] -> keys [S]."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(indices, jnp.uint32))


def device_batch_size(batch_size: int, num_devices: int) -> int:
  """Rows per sampling call: `batch_size` rounded up to a multiple of `num_devices` (100 -> 104 on 8 devices), so
  that the batch splits evenly over the devices; ValueError unless batch_size >= 1."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"sample batch_size must be a positive integer, got {batch_size!r}")
  return -(-int(batch_size) // int(num_devices)) * int(num_devices)


@functools.lru_cache(maxsize=None)
def _log_rounded_batch(batch_size: int, per_call: int, num_devices: int) -> None:
  """Says once per process (per setting) that the batch was rounded up, not at every `sample_codes` call."""
  log.info("sample batch_size %d is not a multiple of the %d local devices: each call draws %d rows (the padding "
           "rows are dropped; the samples do not change)", batch_size, num_devices, per_call)


def sample_codes(loaded: loader.Stage2Model, labels: Sequence[int] | np.ndarray, rng: jax.Array, *, batch_size: int,
                 t_draft: int, t_revise: int, num_revisions: int, draft: logits.PhaseSettings,
                 revise: logits.PhaseSettings, draft_mode: str = "random", confidence_noise: float = 0.0,
                 indices: Optional[Sequence[int]] = None) -> np.ndarray:
  """Draft-and-Revise codes for each condition -> history int32 [M+1, S, N, D] (draft, then revisions).

  `labels` are S class ids [S] or S condition token rows [S, L] (captions). Sample j is drawn with its own key
  fold_in(rng, indices[j]) (indices default to 0, 1, ...): its random numbers depend on the seed, its index, its
  condition and the settings only, whatever the batch size, the number of devices, or how the set is split over hosts
  (`shard_indices`). The codes are bit-identical when every device draws as many rows per call; another per-device
  batch shape rounds the logits differently in the last bits (matmuls tiled for another row count), which can flip a
  rare code, so such sets agree in distribution only. Each call draws `batch_size` rows split over the local devices
  along the batch axis; a `batch_size` that is not a multiple of the devices is rounded up to one
  (`device_batch_size`: the paper's 100 -> 104 on 8 devices; logged once), which costs the padding rows' time but, by
  the keying above, changes no other sample's random numbers. The last batch is padded to the same size (one
  compilation) and all padding rows are dropped.
  `draft_mode` and `confidence_noise` as in `decoder.draft_and_revise`.
  """
  labels = np.asarray(labels, np.int32)
  if labels.ndim == 1:
    labels = labels[:, None]
  indices = np.arange(len(labels)) if indices is None else np.asarray(indices, np.int64)
  if indices.shape != labels.shape[:1]:
    raise ValueError(f"indices {indices.shape} must match labels {labels.shape[:1]}")
  n_dev = sharding.data_parallel_size(loaded.mesh)
  per_call = device_batch_size(batch_size, n_dev)
  if per_call != batch_size:
    _log_rounded_batch(int(batch_size), per_call, n_dev)
  batch_size = per_call
  if not len(labels):  # e.g. a host of a multi-host job when there are fewer samples than hosts
    h, w, d = loaded.code_shape
    return np.zeros((num_revisions + 1, 0, h * w, d), np.int32)
  batch_sharding = sharding.batch_sharding(loaded.mesh)
  progress = reporting.Progress("sample", len(labels), unit="samples")
  out = []
  for i in range(0, len(labels), batch_size):
    chunk = labels[i:i + batch_size]
    pad = batch_size - len(chunk)
    cond = jax.device_put(np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.int32)]), batch_sharding)
    keys = jax.device_put(sample_keys(rng, np.concatenate([indices[i:i + batch_size], np.zeros(pad, np.int64)])),
                          batch_sharding)
    _, history = decoder.draft_and_revise(
        loaded.model, loaded.params, loaded.codebook, cond, keys, t_draft=t_draft, t_revise=t_revise,
        num_revisions=num_revisions, draft=draft, revise=revise, draft_mode=draft_mode,
        confidence_noise=confidence_noise, return_history=True)
    out.append(np.asarray(history)[:, :len(chunk)])
    progress.update(i + len(chunk))
  progress.close()
  return np.concatenate(out, axis=1)


def shard_indices(num_samples: int, process_index: int, process_count: int) -> np.ndarray:
  """The contiguous block of sample indices host `process_index` of `process_count` draws (`core.host.host_range`)."""
  return np.arange(*host.host_range(num_samples, process_index, process_count))


def preview_indices(labels: np.ndarray, *, per_class: int, max_classes: int) -> np.ndarray:
  """Indices of at most `per_class` samples of each of the first `max_classes` classes (in order of appearance)."""
  labels = np.asarray(labels)
  classes = list(dict.fromkeys(labels.tolist()))[:max_classes]
  return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes]).astype(np.int64)


def write_outputs(loaded: loader.Stage2Model, history: np.ndarray, labels: np.ndarray, out_dir: str, ncols: int, *,
                  preview_per_class: int = 10, preview_classes: int = 16, prompts: Sequence[str] | None = None,
                  cond: np.ndarray | None = None) -> dict[str, str]:
  """Writes samples.npz (every final sample, `write_samples_npz`) and the preview grids (`write_previews`).

  Args:
    history: int [M+1, S, N, D] codes of the draft and each revision; labels: int [S].
    ncols: samples per row of the grids (at most `preview_per_class`).
    preview_per_class / preview_classes: the grids show at most this many samples of this many classes, so that
      50,000 samples for FID still make a PNG one can open; the npz always holds all of them.
    prompts: text-to-image: the P prompts, `labels` [S] indexing them; each grid image gets its prompt under it.
    cond: text-to-image: the caption tokens int [S, L], stored in the npz.
  """
  # The whole set first: it is what took the time, and a preview that cannot be drawn must not lose it.
  npz = write_samples_npz(loaded, history[-1], labels, str(fs.path(out_dir) / "samples.npz"), prompts=prompts,
                          cond=cond)
  paths = write_previews(loaded, history, labels, out_dir, ncols, preview_per_class=preview_per_class,
                         preview_classes=preview_classes, prompts=prompts)
  paths["samples_npz"] = npz
  return paths


def check_preview(preview_per_class: int, preview_classes: int) -> None:
  """ValueError unless the preview grids would show at least one sample (checked before any sample is drawn)."""
  for name, value in (("preview_per_class", preview_per_class), ("preview_classes", preview_classes)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")


def write_previews(loaded: loader.Stage2Model, history: np.ndarray, labels: np.ndarray, out_dir: str, ncols: int, *,
                   preview_per_class: int = 10, preview_classes: int = 16,
                   prompts: Sequence[str] | None = None) -> dict[str, str]:
  """samples.png (final samples) and phases.png (draft and each revision side by side) of a capped preview; with
  `prompts`, each image's prompt under it."""
  check_preview(preview_per_class, preview_classes)
  fs.path(out_dir).mkdir(parents=True, exist_ok=True)
  labels = np.asarray(labels, np.int32)
  preview = preview_indices(labels, per_class=preview_per_class, max_classes=preview_classes)
  phases = [loaded.images(h[preview], uint8=True) for h in history]  # each [P, R, R, C]
  ncols = max(1, min(ncols, preview_per_class))
  scale = max(1, 128 // phases[0].shape[1])
  if prompts is None:
    paths = {"samples_png": grids.save_grid(str(fs.path(out_dir) / "samples.png"), phases[-1], ncols, scale)}
    panels = [grids.make_grid(p, ncols) for p in phases]
  else:
    captions = [prompts[i] for i in labels[preview]]
    paths = {"samples_png": grids.save_captioned_grid(str(fs.path(out_dir) / "samples.png"), phases[-1], captions,
                                                      ncols, scale)}
    panels = [grids.captioned_grid(p, captions, ncols, scale) for p in phases]
    scale = 1
  sep = np.full((panels[0].shape[0], 8, panels[0].shape[2]), 128, np.uint8)  # grey bar between the phases
  side_by_side = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=1)
  paths["phases_png"] = grids.save_grid(str(fs.path(out_dir) / "phases.png"), side_by_side[None], 1, scale)
  return paths


def write_samples_npz(loaded: loader.Stage2Model, codes: np.ndarray, labels: np.ndarray, path: str, *,
                      indices: Optional[np.ndarray] = None, prompts: Sequence[str] | None = None,
                      cond: np.ndarray | None = None) -> str:
  """Decodes codes [S, N, D] and writes `path` atomically: arr_0 uint8 [S, H, W, 3] (RGB, as FID evaluators
  expect), labels int32 [S], codes int32 [S, h, w, D], for a shard its sample indices int64 [S], and for
  text-to-image the prompts str [P] and caption tokens cond int32 [S, L].

  The images are decoded chunk by chunk into a uint8 memory-mapped scratch file, so host memory stays at a chunk of
  float images plus the uint8 array's page cache, whatever the number of samples.
  """
  res = loaded.resolution
  with _scratch_file(path) as scratch:
    final = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(len(labels), res, res, 3))
    loaded.images(codes, out=final)
    final.flush()
    arrays = dict(arr_0=final, labels=np.asarray(labels, np.int32),
                  codes=np.asarray(codes).reshape((-1, *loaded.code_shape)).astype(np.int32))
    if indices is not None:
      arrays["indices"] = np.asarray(indices, np.int64)
    if prompts is not None:
      arrays.update(prompts=np.asarray(list(prompts), dtype=str), cond=np.asarray(cond, np.int32))
    with fs.local_file(path, suffix=".npz") as tmp:  # atomic: an earlier file stays whole until the new one is
      np.savez(tmp, **arrays)
      _remove_stale_results(path)
    del final, arrays
  return path


SETTINGS_FILE = "samples.json"


def result_json(npz_path: str, metric: str) -> str:
  """Where `evaluate fid` / `evaluate clip` (`metric` 'fid' / 'clip') write the results of a sample set DIR/NAME.npz
  by default: DIR/NAME.<metric>.json (a string operation: also for gs:// paths)."""
  return os.path.splitext(str(npz_path))[0] + f".{metric}.json"


def stale_results(npz_path: str) -> list[str]:
  """The files beside a sample set DIR/NAME.npz that describe it: the settings `sample` recorded (DIR/samples.json,
  for DIR/samples.npz only) and what `evaluate fid` / `evaluate clip` write by default (`result_json`). They describe
  the set they were written for, so a new set at `npz_path` removes them."""
  target = fs.path(npz_path)
  settings = [str(target.parent / SETTINGS_FILE)] if target.name == "samples.npz" else []
  return [result_json(npz_path, "fid"), result_json(npz_path, "clip"), *settings]


def _remove_stale_results(npz_path: str) -> None:
  """Removes `stale_results(npz_path)` (called just before a new file is renamed onto `npz_path`: interrupted in
  between, the old set stays without its results, never described by them)."""
  for name in stale_results(npz_path):
    if fs.path(name).exists():
      fs.path(name).unlink()


@contextlib.contextmanager
def _scratch_file(path: str) -> Iterator[str]:
  """A local file for a memory-mapped intermediate of `path`: beside it when local, in a temp dir otherwise."""
  target = fs.path(path)
  if fs.is_local(target):
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = str(target.parent / f".{target.name}.uint8.npy")
    try:
      yield scratch
    finally:
      if os.path.exists(scratch):  # a local scratch file, never a user-named location
        os.remove(scratch)
  else:
    with fs.scratch_dir() as d:
      yield os.path.join(d, f"{target.name}.uint8.npy")


SHARD_DIR = "shards"


def shard_path(out_dir: str, process_index: int, process_count: int) -> str:
  """OUT/shards/samples-00003-of-00008.npz: host 3 of 8's part of a sample set."""
  return str(fs.path(out_dir) / SHARD_DIR / f"samples-{process_index:05d}-of-{process_count:05d}.npz")


def merge_shards(out_dir: str, process_count: Optional[int] = None) -> str:
  """Merges OUT/shards/samples-*-of-*.npz (every host's part) into OUT/samples.npz, ordered by sample index.

  `process_count` P (the job that just wrote them): only the shards `-of-P` are read, so shards an earlier job with
  another host count left in OUT are ignored. None (`sample --merge`): the shards must all be of one host count.
  Checks that the shards are one complete set (all P of P present, their indices exactly 0 ... S-1 once each);
  holds one shard's images in memory at a time.
  """
  shard_dir = fs.path(out_dir) / SHARD_DIR
  names = sorted(p.name for p in (shard_dir.iterdir() if shard_dir.is_dir() else [])
                 if p.name.startswith("samples-") and p.name.endswith(".npz"))
  if process_count is not None:
    names = [n for n in names if n.endswith(f"-of-{process_count:05d}.npz")]
  if not names:
    raise FileNotFoundError(f"no sample shards (samples-*-of-*.npz) in {shard_dir}")
  counts = {n.rsplit("-of-", 1)[1][:-len(".npz")] for n in names}
  if len(counts) != 1:
    raise ValueError(f"{shard_dir} mixes shards of different host counts: {sorted(counts)}; remove the stale ones "
                     "(an earlier job's)")
  count = int(counts.pop())
  missing = sorted(set(range(count)) - {int(n[len("samples-"):].split("-of-")[0]) for n in names})
  if missing:
    raise ValueError(f"{shard_dir}: shards of hosts {missing} (of {count}) are missing")
  parts, text = [], []
  for n in names:
    with (shard_dir / n).open("rb") as f, np.load(f) as z:
      parts.append((n, z["indices"], z["labels"], z["codes"], z["arr_0"].shape))
      if "prompts" in z.files:  # text-to-image: the prompts (the same in every shard) and caption tokens
        text.append((tuple(z["prompts"].tolist()), z["cond"]))
  if text and (len(text) != len(parts) or len({t[0] for t in text}) != 1):
    raise ValueError(f"{shard_dir}: the shards do not all hold the same prompts")
  indices = np.concatenate([p[1] for p in parts])
  total = len(indices)
  if not np.array_equal(np.sort(indices), np.arange(total)):
    raise ValueError(f"{shard_dir}: the shards' sample indices are not 0 ... {total - 1} exactly once each")
  order = np.argsort(indices)
  labels = np.concatenate([p[2] for p in parts])[order]
  codes = np.concatenate([p[3] for p in parts])[order]
  extra = {}
  if text:
    extra = dict(prompts=np.asarray(list(text[0][0]), dtype=str), cond=np.concatenate([t[1] for t in text])[order])
  path = str(fs.path(out_dir) / "samples.npz")
  with _scratch_file(path) as scratch:
    images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(total, *parts[0][4][1:]))
    for n, idx, *_ in parts:
      with (shard_dir / n).open("rb") as f, np.load(f) as z:
        images[idx] = z["arr_0"]
    images.flush()
    with fs.local_file(path, suffix=".npz") as tmp:
      np.savez(tmp, arr_0=images, labels=labels, codes=codes, **extra)
      _remove_stale_results(path)
    del images
  return path


def write_sample_set(loaded: loader.Stage2Model, history: np.ndarray, labels: np.ndarray, out_dir: str, *,
                     indices: np.ndarray, ncols: int, preview_per_class: int = 10, preview_classes: int = 16,
                     prompts: Sequence[str] | None = None, cond: np.ndarray | None = None) -> dict[str, str]:
  """Writes the sample set this host drew (`shard_indices`): history int [M+1, S_p, N, D], labels int [S_p] and
  (text) cond int [S_p, L] of the samples `indices` [S_p].

  One host: `write_outputs`. Several: each host writes its shard OUT/shards/samples-I-of-N.npz, then (after a
  barrier) process 0 writes the previews from its own block and merges the shards into OUT/samples.npz (equal to the
  one a single host writes). Returns the written paths on process 0, {} on the other hosts.
  """
  index, count = jax.process_index(), jax.process_count()
  preview = dict(preview_per_class=preview_per_class, preview_classes=preview_classes, prompts=prompts)
  if count == 1:
    return write_outputs(loaded, history, labels, out_dir, ncols, cond=cond, **preview)
  write_samples_npz(loaded, history[-1], labels, shard_path(out_dir, index, count), indices=indices, prompts=prompts,
                    cond=cond)
  fs.barrier(f"ctxrq_sample_shards:{out_dir}")
  if index != 0:
    return {}
  npz = merge_shards(out_dir, count)
  paths = write_previews(loaded, history, labels, out_dir, ncols, **preview)
  paths["samples_npz"] = npz
  return paths


def sample_classes(loaded: loader.Stage2Model, ids: Sequence[int], out_dir: str, *, per_class: int, rng: jax.Array,
                   batch_size: int, t_draft: int, t_revise: int, num_revisions: int, draft: logits.PhaseSettings,
                   revise: logits.PhaseSettings, draft_mode: str = "random", confidence_noise: float = 0.0,
                   preview_per_class: int = 10, preview_classes: int = 16) -> dict[str, str]:
  """`per_class` Draft-and-Revise samples of each class id, drawn across the hosts (each its block of the sample
  indices; sample i depends on (rng, i, settings) only) and written by `write_sample_set`."""
  if per_class < 1:
    raise ValueError(f"samples per class must be >= 1, got {per_class}")
  check_preview(preview_per_class, preview_classes)
  labels = np.repeat(np.asarray(ids, np.int32), per_class)
  mine = shard_indices(len(labels), jax.process_index(), jax.process_count())
  history = sample_codes(loaded, labels[mine], rng, indices=mine, batch_size=batch_size, t_draft=t_draft,
                         t_revise=t_revise, num_revisions=num_revisions, draft=draft, revise=revise,
                         draft_mode=draft_mode, confidence_noise=confidence_noise)
  return write_sample_set(loaded, history, labels[mine], out_dir, indices=mine, ncols=per_class,
                          preview_per_class=preview_per_class, preview_classes=preview_classes)


def run_settings(loaded: loader.Stage2Model) -> dict:
  """The run's `config.sample` settings as keyword arguments of `sample_classes` / `sample_prompts`."""
  s = loaded.config.sample
  return dict(batch_size=int(s.batch_size), t_draft=int(s.T_draft), t_revise=int(s.T_revise), num_revisions=int(s.M),
              draft=logits.PhaseSettings.from_config(s.draft), revise=logits.PhaseSettings.from_config(s.revise))


def settings_record(loaded: loader.Stage2Model, seed: int, settings: dict, **drawn) -> dict:
  """What OUT/samples.json records of a sample set (JSON types): the run, its step, the saved checkpoint
  (`loader.Stage2Model.checkpoint_id`) and which parameters, the seed, every sampling setting (`settings`: the
  keyword arguments of `sample_classes` / `sample_prompts`; not the batch size) and `drawn` (classes or prompts,
  samples of each, their number)."""
  record = {"workdir": fs.name(loaded.workdir), "step": int(loaded.step),
            "checkpoint": getattr(loaded, "checkpoint_id", None), "params": loaded.params_name,
            "seed": int(seed), "T_draft": int(settings["t_draft"]), "T_revise": int(settings["t_revise"]),
            "M": int(settings["num_revisions"]),
            **{k: dataclasses.asdict(settings[k]) for k in ("draft", "revise")},
            "draft_mode": settings.get("draft_mode", "random"),
            "confidence_noise": float(settings.get("confidence_noise", 0.0)), **drawn}
  return json.loads(json.dumps(record))  # as it reads back (lists for tuples)


def write_settings(out_dir: str, record: dict) -> str:
  """Writes OUT/samples.json (after the npz, whose replacement removed the one of the set before); returns its path."""
  return str(fs.write_json(fs.path(out_dir) / SETTINGS_FILE, record, indent=1))


def kept_sample_set(out_dir: str, record: dict) -> Optional[dict[str, str]]:
  """The paths of the set in `out_dir` when its samples.json equals `record` (the same run, saved checkpoint,
  parameters, settings and draw) and its grids and npz are there, else None. A record without a checkpoint name (a
  step saved without a manifest) never matches: such a set is drawn again."""
  out = fs.path(out_dir)
  files = {"samples_png": out / "samples.png", "phases_png": out / "phases.png", "samples_npz": out / "samples.npz",
           "settings_json": out / SETTINGS_FILE}
  if not all(p.exists() for p in files.values()):
    return None
  try:
    saved = json.loads(files["settings_json"].read_text())
  except (OSError, ValueError):
    return None
  same = saved == record and record.get("checkpoint") is not None
  return {name: str(p) for name, p in files.items()} if same else None


def _draw_or_keep(out_dir: str, record: dict, draw) -> dict[str, str]:
  """`kept_sample_set` when it matches `record`, so a recipe run again keeps its samples and the results `evaluate`
  wrote of them; otherwise `draw()` (a new set replaces the old one and its results) and its samples.json."""
  kept = kept_sample_set(out_dir, record)
  if kept is not None:
    log.info("kept the sample set in %s (drawn from this checkpoint with these settings before)", out_dir)
    return kept
  paths = draw()
  if paths:  # process 0
    paths["settings_json"] = write_settings(out_dir, record)
  return paths


def sample_all_classes(workdir: str, out_dir: str, *, samples_per_class: int, seed: int = 0,
                       classes: str = "all") -> dict[str, str]:
  """Samples `samples_per_class` images for each class with the run's `config.sample` settings into `out_dir`, with
  its samples.json; a set drawn there from the same saved checkpoint with the same settings is kept
  (`_draw_or_keep`)."""
  if samples_per_class < 1:
    raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
  loaded = loader.Stage2Model(workdir)
  ids = parse_classes(classes, int(loaded.config.model.num_classes))
  settings = run_settings(loaded)
  record = settings_record(loaded, seed, settings, classes=ids, per_class=samples_per_class,
                           num_samples=len(ids) * samples_per_class)
  return _draw_or_keep(out_dir, record, lambda: sample_classes(
      loaded, ids, out_dir, per_class=samples_per_class, rng=jax.random.key(seed), **settings))


def sample_all_prompts(loaded: loader.Stage2Model, prompts: Sequence[str], out_dir: str, *, per_prompt: int,
                       seed: int = 0) -> dict[str, str]:
  """Text-to-image: `sample_all_classes` for prompts (`sample_prompts` with the run's `config.sample` settings)."""
  settings = run_settings(loaded)
  record = settings_record(loaded, seed, settings, prompts=list(prompts), per_prompt=per_prompt,
                           num_samples=len(prompts) * per_prompt)
  return _draw_or_keep(out_dir, record, lambda: sample_prompts(
      loaded, prompts, out_dir, per_prompt=per_prompt, rng=jax.random.key(seed), **settings))


def read_prompts(spec: str | None = None, path: str | None = None) -> list[str]:
  """Prompts from ';'-separated text and/or a file (one prompt per line, blank lines skipped), in that order.

  Lines end at "\\n" only (a "\\r" before it is dropped), as `evaluate clip --captions_file` reads them: a raw
  caption holding \\x85, U+2028 or another of `str.splitlines`'s separators stays one prompt. Whitespace inside a
  prompt becomes single spaces.
  """
  prompts = [" ".join(p.split()) for p in (spec or "").split(";")]
  if path:
    if not fs.path(path).exists():
      raise ValueError(f"prompts file {path} does not exist")
    prompts += [" ".join(line.split()) for line in fs.path(path).read_bytes().decode("utf-8").split("\n")]
  prompts = [p for p in prompts if p]
  if not prompts:
    raise ValueError("no prompts: pass --prompts='a red bus;a dog' or --prompts_file=FILE")
  return prompts


def prompt_conditions(loaded: loader.Stage2Model, prompts: Sequence[str], per_prompt: int) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
  """(labels int32 [P * per_prompt] prompt indices, cond int32 [P * per_prompt, L] deterministic caption tokens).

  ValueError naming a prompt with no tokens (its condition would be the null one); a warning when prompts are cut
  to L tokens (`CaptionTokenizer.encode_prompts`).
  """
  if per_prompt < 1:
    raise ValueError(f"samples per prompt must be >= 1, got {per_prompt}")
  tokens = loaded.tokenizer().encode_prompts(list(prompts))  # deterministic ids: no BPE dropout when sampling
  labels = np.repeat(np.arange(len(prompts), dtype=np.int32), per_prompt)
  return labels, tokens[labels]


def sample_prompts(loaded: loader.Stage2Model, prompts: Sequence[str], out_dir: str, *, per_prompt: int,
                   rng: jax.Array, batch_size: int, t_draft: int, t_revise: int, num_revisions: int,
                   draft: logits.PhaseSettings, revise: logits.PhaseSettings, draft_mode: str = "random",
                   confidence_noise: float = 0.0, preview_per_prompt: int = 10,
                   preview_prompts: int = 16) -> dict[str, str]:
  """Text-to-image: `per_prompt` Draft-and-Revise samples of each prompt, written by `write_outputs` with the prompt
  under each image."""
  if not loaded.model.is_text:
    raise ValueError(f"{loaded.workdir} is a class-conditional run; sample it with class ids, not prompts")
  check_preview(preview_per_prompt, preview_prompts)
  labels, cond = prompt_conditions(loaded, prompts, per_prompt)
  mine = shard_indices(len(labels), jax.process_index(), jax.process_count())
  history = sample_codes(loaded, cond[mine], rng, indices=mine, batch_size=batch_size, t_draft=t_draft,
                         t_revise=t_revise, num_revisions=num_revisions, draft=draft, revise=revise,
                         draft_mode=draft_mode, confidence_noise=confidence_noise)
  return write_sample_set(loaded, history, labels[mine], out_dir, indices=mine, ncols=per_prompt,
                          preview_per_class=preview_per_prompt, preview_classes=preview_prompts,
                          prompts=list(prompts), cond=cond[mine])
