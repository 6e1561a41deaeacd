"""The paper's sampling ablations on one stage-2 run, scored by the digit judge (`evaluation/digits.py`).

  Table 3   classifier-free guidance in neither phase / the revise phase only / both phases
  Table 4   T_draft 8 / 32 / 64 with seconds per sample
  Fig. 4a   T_draft sweep: the drafts' (and the final samples') quality
  Fig. 4b   the number of revisions M = 0 ... max
  Fig. 4c   T_revise sweep
  guidance  the revise phase's guidance scale

Every setting is the run's `config.sample` with one thing changed. Each distinct setting is sampled once, with
max(M, max_revisions) revisions: revision m of a run depends only on the phases before it, so the first M phases of
that run are what M revisions give, and the M = 0 ... max curve comes for free. Every image set has the same size
(`per_class` of each class), the size the real held-out digits and their reconstructions are scored at.
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from ctxrq_jax.core import paths as fs
from ctxrq_jax.core import reporting
from ctxrq_jax.core import sharding
from ctxrq_jax.evaluation import digits
from ctxrq_jax.sampling import logits
from ctxrq_jax.sampling import runner


@dataclasses.dataclass(frozen=True)
class Setting:
  """One sampler setting (M is not part of it: runs use the largest M any table needs)."""
  t_draft: int
  t_revise: int
  draft: logits.PhaseSettings
  revise: logits.PhaseSettings


TABLES = ("table3", "table4", "fig4a", "fig4b", "fig4c", "guidance")


@dataclasses.dataclass(frozen=True)
class Sweeps:
  """What to vary; values above the number of positions N are skipped (T > N), and said so."""
  tables: Sequence[str] = TABLES
  t_drafts: Sequence[int] = (4, 8, 16, 32, 64)
  timed_t_drafts: Sequence[int] = (8, 32, 64)
  t_revises: Sequence[int] = (1, 2, 4, 8)
  max_revisions: int = 4
  guidance_scales: Sequence[float] = (0.0, 0.5, 1.0, 1.8, 3.0)
  table3_scale: Optional[float] = None  # Table 3's guidance scale; None: the run's revise guidance, else the largest
  revise_temperatures: Sequence[float] = ()  # the guidance sweep at each of these; () = the run's revise temperature

  def __post_init__(self):
    unknown = sorted(set(self.tables) - set(TABLES))
    if unknown:
      raise ValueError(f"unknown ablation tables {unknown}; choose from {list(TABLES)}")


class Ablation:
  """Samples and scores settings of one stage-2 run, each once (memoised)."""

  def __init__(self, evaluator: digits.SampleEvaluator, *, seed: int = 0, max_revisions: int = 4,
               log: Callable[[str], None] = print):
    self.ev = evaluator
    s = evaluator.loaded.config.sample
    self.base = Setting(int(s.T_draft), int(s.T_revise), logits.PhaseSettings.from_config(s.draft),
                        logits.PhaseSettings.from_config(s.revise))
    self.base_m = int(s.M)
    self.num_revisions = max(self.base_m, int(max_revisions))
    self.num_positions = int(np.prod(evaluator.loaded.code_shape[:2]))
    self.seed = seed
    self.log = log
    self._scores: dict[Setting, dict[str, dict[str, float]]] = {}

  def describe(self, setting: Setting, num_revisions: Optional[int] = None) -> str:
    return digits.describe_settings(t_draft=setting.t_draft, t_revise=setting.t_revise,
                                    num_revisions=self.base_m if num_revisions is None else num_revisions,
                                    draft=setting.draft, revise=setting.revise)

  def fits(self, setting: Setting) -> bool:
    return setting.t_draft <= self.num_positions and setting.t_revise <= self.num_positions

  def scores(self, setting: Setting) -> dict[str, dict[str, float]]:
    """{'draft', 'revision 1', ...: metrics} of `setting` sampled with `num_revisions` revisions (memoised)."""
    if setting not in self._scores:
      t0 = time.perf_counter()
      history = self.ev.sample(jax.random.key(self.seed), t_draft=setting.t_draft, t_revise=setting.t_revise,
                               num_revisions=self.num_revisions, draft=setting.draft, revise=setting.revise)
      self._scores[setting] = self.ev.score_phases(history)
      self.log(f"  {self.describe(setting, self.num_revisions)}: {time.perf_counter() - t0:.0f} s")
    return self._scores[setting]

  def final(self, setting: Setting) -> dict[str, float]:
    """Metrics after the run config's M revisions."""
    return self.scores(setting)[digits.phase_name(self.base_m)]

  @property
  def timed_batch(self) -> int:
    """Rows of the batch `seconds_per_sample` times: sample.batch_size rounded up to a multiple of the devices."""
    return runner.device_batch_size(int(self.ev.loaded.config.sample.batch_size),
                                    sharding.data_parallel_size(self.ev.loaded.mesh))

  def seconds_per_sample(self, setting: Setting) -> tuple[float, float]:
    """(sampling, decoding) wall time per sample of one batch with the run's M, after one untimed batch that
    compiles: the codes (Draft-and-Revise), then the RQ-VAE decode of the final codes to images (the official
    RQ-Transformer's throughput script reports the two parts separately too). The batch is the config's rounded up
    to the rows one sampling call draws on this host's devices (`runner.device_batch_size`): all of them real samples,
    so no padding row is counted as a sample's time."""
    batch = self.timed_batch
    labels = self.ev.labels[:batch]
    if len(labels) < batch:
      labels = np.resize(labels, batch)
    kwargs = dict(batch_size=batch, labels=labels, t_draft=setting.t_draft, t_revise=setting.t_revise,
                  num_revisions=self.base_m, draft=setting.draft, revise=setting.revise)
    self.ev.loaded.images(self.ev.sample(jax.random.key(self.seed + 1), **kwargs)[-1])
    t0 = time.perf_counter()
    codes = self.ev.sample(jax.random.key(self.seed + 2), **kwargs)[-1]
    t1 = time.perf_counter()
    self.ev.loaded.images(codes)
    return (t1 - t0) / batch, (time.perf_counter() - t1) / batch


def _with(setting: Setting, **changes) -> Setting:
  return dataclasses.replace(setting, **changes)


def _guided(phase: logits.PhaseSettings, scale: float) -> logits.PhaseSettings:
  return dataclasses.replace(phase, guidance_scale=float(scale))


def run(evaluator: digits.SampleEvaluator, sweeps: Sweeps = Sweeps(), *, seed: int = 0,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """All tables; returns {'header', 'reference_rows', 'tables': {name: {'title', 'columns', 'rows', 'x', ...}}}.

  Every row is [label, *metric cells]; 'series' holds the numbers behind the plots.
  """
  ab = Ablation(evaluator, seed=seed, max_revisions=sweeps.max_revisions, log=log)
  base = ab.base
  scale = sweeps.table3_scale
  if scale is None:
    scale = base.revise.guidance_scale or max(sweeps.guidance_scales)
  tables: dict[str, Any] = {}
  skipped: list[str] = []

  def metric_row(label, m, *extra):
    return [label, *extra, *digits.metric_cells(m)]

  want = set(sweeps.tables)
  # Table 3: where guidance is applied.
  variants = [("neither phase", _with(base, draft=_guided(base.draft, 0), revise=_guided(base.revise, 0))),
              ("revise phase only", _with(base, draft=_guided(base.draft, 0), revise=_guided(base.revise, scale))),
              ("both phases", _with(base, draft=_guided(base.draft, scale), revise=_guided(base.revise, scale)))]
  rows, series = [], {"draft": [], "final": []}
  for name, s in (variants if "table3" in want else []):
    sc = ab.scores(s)
    rows.append(metric_row(f"{name}: draft", sc["draft"]))
    rows.append(metric_row(f"{name}: after {ab.base_m} revisions", ab.final(s)))
    series["draft"].append(sc["draft"])
    series["final"].append(ab.final(s))
  if "table3" in want:
    tables["table3"] = {"title": f"Table 3: classifier-free guidance (scale {scale:g}) by phase",
                        "columns": ["guidance in", *digits.METRIC_HEADER], "rows": rows,
                        "x": [n for n, _ in variants], "series": series}

  # Table 4: T_draft with seconds per sample.
  rows = []
  for t in (sweeps.timed_t_drafts if "table4" in want else []):
    s = _with(base, t_draft=int(t))
    if not ab.fits(s):
      skipped.append(f"Table 4 T_draft {t} (T > N={ab.num_positions})")
      continue
    sample_s, decode_s = ab.seconds_per_sample(s)
    rows.append(metric_row(str(t), ab.final(s), f"{sample_s:.4f}", f"{decode_s:.4f}"))
  if "table4" in want:
    tables["table4"] = {"title": f"Table 4: T_draft with T_revise {base.t_revise}, M {ab.base_m} (batch "
                                 f"{ab.timed_batch}, this machine)",
                        "columns": ["T_draft", "s/sample", "decode s/sample", *digits.METRIC_HEADER],
                        "rows": rows}

  def sweep(name, title, label, values, make, phases=("draft", "final")):
    if name not in want:
      return
    rows, xs, series = [], [], {p: [] for p in phases}
    for v in values:
      s = make(v)
      if not ab.fits(s):
        skipped.append(f"{title.split(':')[0]} {label} {v} (T > N={ab.num_positions})")
        continue
      sc = ab.scores(s)
      xs.append(v)
      for p in phases:
        m = sc["draft"] if p == "draft" else ab.final(s)
        series[p].append(m)
        rows.append(metric_row(f"{v} ({'draft' if p == 'draft' else f'after {ab.base_m} revisions'})", m))
    tables[name] = {"title": title, "columns": [label, *digits.METRIC_HEADER], "rows": rows, "x": xs,
                    "series": series, "xlabel": label}

  sweep("fig4a", "Fig. 4a: T_draft", "T_draft", [int(t) for t in sweeps.t_drafts],
        lambda t: _with(base, t_draft=t))
  # Fig. 4b: one run, its phases.
  if "fig4b" in want:
    sc = ab.scores(base)
    ms = list(range(ab.num_revisions + 1))
    tables["fig4b"] = {"title": f"Fig. 4b: number of revisions M (T_draft {base.t_draft}, T_revise {base.t_revise})",
                       "columns": ["M", *digits.METRIC_HEADER],
                       "rows": [metric_row(str(m), sc[digits.phase_name(m)]) for m in ms], "x": ms,
                       "series": {"after M revisions": [sc[digits.phase_name(m)] for m in ms]}, "xlabel": "M"}
  sweep("fig4c", "Fig. 4c: T_revise", "T_revise", [int(t) for t in sweeps.t_revises],
        lambda t: _with(base, t_revise=t), phases=("final",))
  if "guidance" in want:  # the revise phase's guidance scale, at each revise temperature asked for
    rows, series = [], {}
    scales = [float(g) for g in sweeps.guidance_scales]
    for temp in [float(t) for t in sweeps.revise_temperatures] or [base.revise.temperature]:
      key = f"after {ab.base_m} revisions, revise temperature {temp:g}"
      series[key] = []
      for g in scales:
        m = ab.final(_with(base, revise=dataclasses.replace(base.revise, temperature=temp, guidance_scale=g)))
        series[key].append(m)
        rows.append(metric_row(f"{g:g} (temperature {temp:g})", m))
    tables["guidance"] = {"title": "Revise guidance scale", "columns": ["scale", *digits.METRIC_HEADER],
                          "rows": rows, "x": scales, "series": series, "xlabel": "revise guidance scale"}
  return {"header": (f"{len(evaluator.labels)} samples per setting ({evaluator.per_class} per class), seed {seed}; "
                     f"base setting: {ab.describe(base)}; digit-CNN features, reference: the "
                     f"{len(evaluator.judge.reference)} training digits"),
          "reference_rows": evaluator.reference_rows, "tables": tables, "skipped": skipped}


def format_report(results: dict[str, Any], *, markdown: bool = False) -> str:
  """Every table, each under its title, with the real and reconstructed digits' rows first for scale."""
  render = reporting.markdown_table if markdown else reporting.table
  ref_rows = [[name, *digits.metric_cells(m)] for name, m in results["reference_rows"].items()]
  parts = [results["header"], "", "Reference rows (same number of images):",
           render(ref_rows, ["image set", *digits.METRIC_HEADER])]
  for t in results["tables"].values():
    parts += ["", ("### " if markdown else "") + t["title"], render(t["rows"], t["columns"])]
  if results["skipped"]:
    parts += ["", "skipped: " + "; ".join(results["skipped"])]
  return "\n".join(parts)


def plot(results: dict[str, Any], out_dir: str) -> list[str]:
  """One PNG per sweep (FD, precision, recall against the swept value); returns the paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  ref = results["reference_rows"]
  for name, t in results["tables"].items():
    if "xlabel" not in t or not t["x"]:
      continue
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, metric, label in zip(axes, ("fd", "precision", "recall"), ("Fréchet distance ↓", "precision ↑",
                                                                        "recall ↑")):
      for series, values in t["series"].items():
        ax.plot(t["x"], [v[metric] for v in values], marker="o", label=series)
      for (row, m), style in zip(ref.items(), (":", "--")):
        ax.axhline(m[metric], color="gray", linestyle=style, linewidth=1, label=row)
      ax.set_xlabel(t["xlabel"])
      ax.set_title(label)
      if t["xlabel"] == "T_draft":
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.suptitle(t["title"], fontsize=10)
    fig.tight_layout()
    path = str(fs.path(out_dir) / f"{name}.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    fs.write_bytes(path, buf.getvalue())
    plt.close(fig)
    paths.append(path)
  return paths


def write(results: dict[str, Any], out_dir: str) -> dict[str, str]:
  """ablation.md (the tables), ablation.json (the numbers) and the plots under `out_dir`; returns their paths."""
  fs.path(out_dir).mkdir(parents=True, exist_ok=True)
  md = str(fs.write_text(fs.path(out_dir) / "ablation.md", format_report(results, markdown=True) + "\n"))
  js = str(fs.write_json(fs.path(out_dir) / "ablation.json", results, indent=1))
  out = {"markdown": md, "json": js}
  out.update({fs.path(p).stem: p for p in plot(results, out_dir)})
  return out
