"""What a stage-2 workdir records about the data its model trains on, one small JSON file per fact:
{"sha256": the fingerprint, "codes_dir": the code dataset it was read from}. `data.codes` records the codebook
(codebook.json), `data.tokenizer` the caption tokenizer (tokenizer.json); each compares a resumed or sampled run's
data with its record, since data re-made with another stage-1 model or tokenizer keeps its shapes and nothing else
would notice.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from ctxrq_jax.core import paths


def record(workdir: str, name: str, fingerprint: str, codes_dir: str) -> None:
  """Writes WORKDIR/`name`: `fingerprint` of the data read from `codes_dir`."""
  paths.write_json(paths.path(workdir) / name, {"sha256": str(fingerprint), "codes_dir": paths.name(codes_dir)})


def recorded(workdir: str, name: str) -> Optional[dict[str, Any]]:
  """The record WORKDIR/`name` ({'sha256', 'codes_dir'}), None when the run has none (a run from before the record)."""
  path = paths.path(workdir) / name
  return json.loads(path.read_text()) if path.exists() else None


def check(workdir: str, name: str, fingerprint: str, mismatch: Callable[[dict[str, Any]], str]) -> bool:
  """False when the run records no WORKDIR/`name`, True when its fingerprint is `fingerprint`; else ValueError with
  `mismatch(record)` as its message."""
  saved = recorded(workdir, name)
  if saved is None:
    return False
  if saved.get("sha256") != fingerprint:
    raise ValueError(mismatch(saved))
  return True
