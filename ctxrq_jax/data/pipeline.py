"""The one grain pipeline behind every iterator: image batches and code batches differ only in their source and
per-example transform.

    source ─► map_with_index(decode + validate) ─► seed ─► shuffle (train) ─► repeat
           ─► map / random_map(transform) ─► host slice ─► batch ─► to_iter_dataset(threads)
           ─► [mp_prefetch(workers)]

Decoding and validation run against the index in the source, so an error names the record that is wrong whatever
the shuffle. Every host builds the same global stream (one shuffle per epoch, one random draw per position) and
takes its strided slice of it, so within an epoch hosts see disjoint examples and together a uniform shuffle, each
example with its own draw. Randomness comes only from grain's per-index, per-epoch seeding, so the iterator's
`get_state()` (a position) fully determines all later batches and `set_state()` reproduces them exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

_MAX_SEED = 2**32 - 1


def _flags_parsed() -> bool:
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.FLAGS.is_parsed()


def check_iterator_args(*, batch_size: int, seed: int, shard_index: int, shard_count: int,
                        num_epochs: int | None, worker_count: int, num_threads: int) -> None:
  """Raises ValueError naming the first bad iterator argument."""
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _MAX_SEED:
    raise ValueError(f"seed must be an integer in [0, 2**32 - 1], got {seed!r}")
  if not isinstance(shard_count, (int, np.integer)) or shard_count < 1:
    raise ValueError(f"shard_count must be a positive integer, got {shard_count!r}")
  if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index!r}")
  if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
    raise ValueError(f"num_epochs must be None or a positive integer, got {num_epochs!r}")
  if not isinstance(worker_count, (int, np.integer)) or worker_count < 0:
    raise ValueError(f"worker_count must be a non-negative integer, got {worker_count!r}")
  if not isinstance(num_threads, (int, np.integer)) or num_threads < 0:
    raise ValueError(f"num_threads must be a non-negative integer, got {num_threads!r}")


def build_iterator(
    source: Any,
    *,
    decode: Callable[[int, Any], Any],
    transform: Callable[[Any, np.random.Generator | None], dict[str, np.ndarray]],
    random_transform: bool,
    batch_size: int,
    seed: int,
    train: bool,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    drop_remainder: bool | None = None,
    worker_count: int = 0,
    num_threads: int = 2,
    prefetch_buffer_size: int = 4,
    description: str = "data set",
    example_range: tuple[int, int] | None = None,
) -> grain.DatasetIterator:
  """Builds a checkpointable iterator of batches over a random-access `source`.

  Args:
    source: anything with `__len__` and `__getitem__(int)` (a grain/tfds data source or a sequence).
    decode: `(source_index, record) -> example`; validates the record and raises ValueError naming the index.
    transform: `(example, rng) -> dict of arrays`; `rng` is a numpy Generator when `random_transform`, else None.
    random_transform: whether `transform` draws random numbers (then it gets grain's per-example, per-epoch rng).
    batch_size: examples per batch (per host).
    seed: shuffle and augmentation seed, in [0, 2**32 - 1].
    train: shuffle, and (by default) repeat forever and drop the last partial batch.
    shard_index, shard_count: this host's strided slice of the global stream (`jax.process_index(),
      jax.process_count()`).
    num_epochs: passes over the source (each host reads its share of each); None means forever when `train` else
      one pass.
    drop_remainder: drop a final partial batch; None means `train`.
    worker_count: grain worker processes (0 keeps everything in this process).
    num_threads: reader threads in this process (0 reads synchronously).
    prefetch_buffer_size: batches read ahead by the threads.
    description: names the data in errors.
    example_range: one pass without shuffling only: keep examples [start, stop) of the shard, transformed exactly
      as in the whole pass (their random draws depend on their index in the source, not in the range); for splitting
      one ordered pass between processes (`encode`).

  Returns:
    A `grain.DatasetIterator` of batches (dicts of arrays with a leading [B] axis) with `get_state()` /
    `set_state()`.
  """
  check_iterator_args(batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count,
                      num_epochs=num_epochs, worker_count=worker_count, num_threads=num_threads)
  if drop_remainder is None:
    drop_remainder = train
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ValueError(f"{description} is empty")
  ds = ds.map_with_index(decode)
  if shard_index >= len(ds):
    raise ValueError(f"shard {shard_index} of {shard_count} of {description} is empty "
                     f"({len(source)} examples in all); use fewer shards")
  # One global order and one set of random draws, of which each host takes its strided share: the hosts' examples
  # of a step are a uniform shuffle, each with its own draw. (Shuffling each host's shard with the same seed gave every
  # host the same permutation and the same draws at each position, so a global batch held P-tuples of neighbouring
  # records and B/P augmentation draws.) With one host the slice is the whole stream: the same batches as before.
  ds = ds.seed(int(seed))
  if train:
    ds = ds.shuffle()
  epochs = num_epochs if num_epochs is not None else (None if train else 1)
  ds = ds.repeat(epochs)
  if random_transform:
    ds = ds.random_map(transform)
  else:
    ds = ds.map(lambda example: transform(example, None))
  ds = ds[shard_index::shard_count]
  if example_range is not None:
    start, stop = (int(i) for i in example_range)
    if train or epochs != 1 or not 0 <= start <= stop <= len(ds):
      raise ValueError(f"example_range must be [start, stop) within the {len(ds)} examples of one unshuffled pass "
                       f"over {description}, got {tuple(example_range)} with train={train}, num_epochs={epochs}")
    ds = ds[start:stop]
  ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
  if epochs is not None and len(ds) == 0:
    raise ValueError(f"shard {shard_index} of {shard_count} of {description} has fewer examples than one batch "
                     f"of {batch_size} with drop_remainder=True")
  iter_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=int(prefetch_buffer_size)))
  if worker_count > 0:
    if not _flags_parsed():
      # grain's worker processes read absl flags; unparsed flags fail deep inside a worker thread otherwise.
      raise ValueError("worker_count > 0 needs parsed absl flags: run under absl.app.run, or call "
                       "absl.flags.FLAGS.mark_as_parsed() first (or use worker_count=0)")
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
  return iter(iter_ds)
