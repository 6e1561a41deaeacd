"""The ablation tables (ctxrq_jax/evaluation/ablation.py) on a scripted evaluator: which settings are sampled (each
once, M revisions taken as prefixes of one run), what lands in which table, what is skipped, and the files written.
The end-to-end run on a trained model is tests/integration/test_demo.py."""

import json
import os
import types

import ml_collections
import numpy as np
import pytest

from ctxrq_jax.evaluation import ablation
from ctxrq_jax.evaluation import digits


class ScriptedEvaluator:
  """The interface of digits.SampleEvaluator; codes carry the setting, metrics are a known function of them."""

  def __init__(self):
    sample = ml_collections.ConfigDict(dict(
        T_draft=4, T_revise=2, M=2, batch_size=6,
        draft=dict(temperature=1.0, guidance=0.0, top_k=0, top_p=1.0),
        revise=dict(temperature=0.8, guidance=1.8, top_k=0, top_p=1.0)))
    self.decoded = []  # the code arrays Table 4 decodes to images
    # Four data-parallel devices: sampling draws the batch of 6 as 8 rows, and Table 4 times 8 real samples.
    self.loaded = types.SimpleNamespace(config=ml_collections.ConfigDict(dict(sample=sample)), code_shape=(4, 4, 2),
                                        images=lambda codes: self.decoded.append(codes) or np.zeros((len(codes), 8, 8)),
                                        mesh=types.SimpleNamespace(shape={"data": 4, "fsdp": 1, "tensor": 1}))
    self.per_class = 2
    self.labels = digits.balanced_labels(3, 2)
    self.judge = types.SimpleNamespace(reference=np.zeros((30, 8)))
    self.reference_rows = {"real held-out digits": dict(fd=1.0, precision=0.9, recall=0.9, accuracy=0.95),
                           "RQ-VAE reconstructions": dict(fd=2.0, precision=0.85, recall=0.8, accuracy=0.9)}
    self.calls = []

  def sample(self, rng, *, t_draft, t_revise, num_revisions, draft, revise, batch_size=None, labels=None):
    del rng, batch_size
    n = len(self.labels if labels is None else labels)
    self.calls.append((t_draft, t_revise, num_revisions, draft.guidance_scale, revise.guidance_scale, n,
                       revise.temperature))
    history = np.zeros((num_revisions + 1, n, 16, 2), np.int32)
    history[..., 0] = t_draft
    history[..., 1] = t_revise + 100 * int(draft.guidance_scale > 0) + 10 * revise.guidance_scale
    for p in range(num_revisions + 1):
      history[p, :, 1, 0] = p
    return history

  def score_phases(self, history):
    out = {}
    for p, codes in enumerate(history):
      t_draft, tag = int(codes[0, 0, 0]), float(codes[0, 0, 1])
      out[digits.phase_name(p)] = dict(fd=100.0 / t_draft + tag / (1 + p), precision=0.5, recall=0.25 + 0.01 * p,
                                       accuracy=0.5)
    return out


def test_tables_sample_each_setting_once_and_skip_what_does_not_fit(tmp_path):
  ev = ScriptedEvaluator()
  sweeps = ablation.Sweeps(t_drafts=(2, 4, 8, 32), timed_t_drafts=(8, 32), t_revises=(1, 2), max_revisions=3,
                           guidance_scales=(0.0, 1.8))
  results = ablation.run(ev, sweeps, log=lambda _: None)
  full = [c for c in ev.calls if c[5] == 6 and c[2] == 3]  # scored runs: all labels, max(M, 3) revisions
  settings = {c[:5] for c in full}
  assert len(full) == len(settings)  # memoised: no setting sampled twice
  # base (4, 2, g 0 / 1.8); neither (= guidance 0); both; T_draft 2 and 8; T_revise 1.
  assert settings == {(4, 2, 3, 0.0, 1.8), (4, 2, 3, 0.0, 0.0), (4, 2, 3, 1.8, 1.8), (2, 2, 3, 0.0, 1.8),
                      (8, 2, 3, 0.0, 1.8), (4, 1, 3, 0.0, 1.8)}
  # Table 4 times T_draft 8 with the run's M = 2 on one batch (a warm-up call, then the timed one) of the 8 rows a
  # call draws on 4 devices, all real samples (s/sample = seconds / 8, not / 6); 32 > N = 16.
  assert [c[:6] for c in ev.calls if c[2] == 2] == [(8, 2, 2, 0.0, 1.8, 8)] * 2
  t = results["tables"]
  assert [r[0] for r in t["table4"]["rows"]] == ["8"] and min(float(c) for c in t["table4"]["rows"][0][1:3]) >= 0
  assert t["table4"]["columns"][:3] == ["T_draft", "s/sample", "decode s/sample"]
  assert "(batch 8, this machine)" in t["table4"]["title"]
  # Each timed batch's final codes (after M = 2 revisions) are decoded: the warm-up's, then the timed one's.
  assert len(ev.decoded) == 2 and all(c.shape == (8, 16, 2) and np.all(c[:, 1, 0] == 2) for c in ev.decoded)
  assert any("T_draft 32" in s for s in results["skipped"]) and any("Table 4 T_draft 32" in s
                                                                     for s in results["skipped"])
  assert t["fig4a"]["x"] == [2, 4, 8]
  # Table 3: guidance in neither / revise only / both, draft and final (M = 2) rows; the metric is known.
  assert [r[0] for r in t["table3"]["rows"]] == ["neither phase: draft", "neither phase: after 2 revisions",
                                                  "revise phase only: draft", "revise phase only: after 2 revisions",
                                                  "both phases: draft", "both phases: after 2 revisions"]
  assert t["table3"]["series"]["final"][1]["fd"] == 100 / 4 + (2 + 18) / 3
  # Fig. 4b: M = 0..3 are the phases of the base run.
  assert t["fig4b"]["x"] == [0, 1, 2, 3]
  assert [m["recall"] for m in t["fig4b"]["series"]["after M revisions"]] == [0.25, 0.26, 0.27, 0.28]
  assert t["guidance"]["x"] == [0.0, 1.8] and t["fig4c"]["x"] == [1, 2]

  report = ablation.format_report(results)
  for title in ("Table 3", "Table 4", "Fig. 4a", "Fig. 4b", "Fig. 4c", "guidance scale", "real held-out digits"):
    assert title in report, title
  paths = ablation.write(results, str(tmp_path / "out"))
  assert set(paths) == {"markdown", "json", "fig4a", "fig4b", "fig4c", "guidance"}
  for p in paths.values():
    assert os.path.getsize(p) > 0
  assert json.load(open(paths["json"]))["tables"]["fig4a"]["x"] == [2, 4, 8]
  assert open(paths["markdown"]).read().count("| --- |") >= 6


def test_table_selection_and_the_guidance_grid():
  ev = ScriptedEvaluator()
  sweeps = ablation.Sweeps(tables=("guidance",), guidance_scales=(0.0, 1.8), revise_temperatures=(0.8, 1.0),
                           max_revisions=2)
  results = ablation.run(ev, sweeps, log=lambda _: None)
  assert list(results["tables"]) == ["guidance"]
  assert sorted((c[4], c[6]) for c in ev.calls) == [(0.0, 0.8), (0.0, 1.0), (1.8, 0.8), (1.8, 1.0)]
  t = results["tables"]["guidance"]
  assert list(t["series"]) == ["after 2 revisions, revise temperature 0.8", "after 2 revisions, revise temperature 1"]
  assert [r[0] for r in t["rows"]] == ["0 (temperature 0.8)", "1.8 (temperature 0.8)", "0 (temperature 1)",
                                      "1.8 (temperature 1)"]
  with pytest.raises(ValueError, match="unknown ablation tables"):
    ablation.Sweeps(tables=("table5",))
