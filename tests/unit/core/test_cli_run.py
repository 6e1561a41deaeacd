"""How a command ends (ctxrq_jax/core/cli.py `run`), in this process: a user's mistake is one `error: ...` line on
stderr and exit 2, a diverged run one line and exit 1, anything else (a bug) a traceback; `--verbosity=1` gives the
traceback of a mistake too. Then the mistakes the commands report, each through its command's own flags and `main`
where that needs no trained run (tests/integration/test_install.py runs a few of them from the installed wheel).
"""

import json
import logging as py_logging
import os
import sys
import types

from absl import app
from absl import flags
from absl import logging
from absl.testing import flagsaver
import numpy as np
from PIL import Image
import pytest

from ctxrq_jax import convert
from ctxrq_jax import demo
from ctxrq_jax import encode
from ctxrq_jax import evaluate
from ctxrq_jax import sample
from ctxrq_jax import train
from ctxrq_jax.core import cli
from ctxrq_jax.core import config as configlib
from ctxrq_jax.sampling import loader
from ctxrq_jax.sampling import runner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# What `run` changes beyond the flags: the loggers `quiet_dependencies` sets and the variables it sets by default.
_DEPENDENCIES = ("jax", "orbax", "grain", "etils", "tensorflow")
_LOGGERS = (*_DEPENDENCIES, *cli.KEPT_WARNINGS, "ctxrq_jax", "absl")
_ENV = ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")


@pytest.fixture()
def run(monkeypatch, capsys):
  """`run(main, define_flags, *args)`: `cli.run(main, define_flags)` as `python -m ... args` runs it -> (exit code,
  stderr lines); an exception `run` lets through propagates. absl's flags are process-wide, so each call leaves them
  as it found them (the command's flags deleted, values restored, unparsed again), and the loggers and environment too.
  absl's once-per-process set-up (process name, a root log handler, faulthandler) is skipped: it is not `run`'s, and
  it would change this test process."""
  monkeypatch.setattr(app._run_init, "done", True)  # pylint: disable=protected-access

  def call(main, define_flags, *args):
    saved_flags, was_parsed = flagsaver.save_flag_values(), flags.FLAGS.is_parsed()
    saved_loggers = {name: (lg.level, list(lg.handlers), lg.propagate)
                     for name, lg in ((n, py_logging.getLogger(n)) for n in _LOGGERS)}
    saved_env = {name: os.environ.get(name) for name in _ENV}
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["prog", *args])
    try:
      cli.run(main, define_flags)
    except SystemExit as e:
      return e.code, capsys.readouterr().err.splitlines()
    finally:
      flagsaver.restore_flag_values(saved_flags)
      if not was_parsed:
        flags.FLAGS.unparse_flags()
      for name, (level, handlers, propagate) in saved_loggers.items():
        lg = py_logging.getLogger(name)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate
      for name, value in saved_env.items():
        if value is None:
          os.environ.pop(name, None)
        else:
          os.environ[name] = value
    raise AssertionError("absl's app.run returned instead of exiting")

  return call


def _raising(exception):
  def main(argv):
    del argv
    raise exception
  return main


# Every kind of exception `cli.USER_ERRORS` names (ConfigError is a ValueError), each as a command raises it.
@pytest.mark.parametrize("exception", [
    ValueError("t_draft=65 exceeds N=64"),
    configlib.ConfigError("unknown config keys: train.batch_sise"),
    FileNotFoundError("workdir missing/stage2 does not exist"),
    FileExistsError("out exists"),
    NotADirectoryError("codes is not a directory"),
    IsADirectoryError("samples.npz is a directory"),
    app.UsageError("--smoke uses the demo's own smoke configs"),
    flags.IllegalFlagValueError("--seed must be in [0, 2**32)"),
], ids=lambda e: type(e).__name__)
def test_a_users_mistake_is_one_error_line_and_exit_2(run, exception):
  assert run(_raising(exception), None) == (2, [f"error: {exception}"])


def test_the_error_line_is_the_messages_first_line_or_the_exceptions_name(run):
  assert run(_raising(ValueError("mask m.png is 28x20 pixels\n  but image i.png is 28x28")), None) == (
      2, ["error: mask m.png is 28x20 pixels"])
  assert run(_raising(ValueError()), None) == (2, ["error: ValueError"])


def test_a_diverged_run_is_one_line_and_exit_1(run):
  assert run(_raising(FloatingPointError("loss is nan at step 3")), None) == (1, ["error: loss is nan at step 3"])


@pytest.mark.parametrize("exception", [RuntimeError("a bug"), KeyError("a bug"), TypeError("a bug")],
                         ids=lambda e: type(e).__name__)
def test_anything_else_is_a_traceback(run, capsys, exception):
  # Not a SystemExit with one line: the exception itself leaves `run` (Python prints its traceback, exit 1).
  with pytest.raises(type(exception), match="a bug"):
    run(_raising(exception), None)
  assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("exception", [ValueError("t_draft=65 exceeds N=64"),
                                       FloatingPointError("loss is nan at step 3")], ids=lambda e: type(e).__name__)
def test_verbosity_1_gives_the_traceback_of_a_mistake(run, capsys, exception):
  with pytest.raises(type(exception), match=str(exception)):
    run(_raising(exception), None, "--verbosity=1")
  assert "error:" not in capsys.readouterr().err


def test_a_command_that_succeeds_exits_0_with_its_arguments_and_quiet_dependencies(run):
  seen = {}

  def main(argv):
    seen["argv"], seen["n"] = argv, flags.FLAGS.n
    seen["levels"] = {name: py_logging.getLogger(name).getEffectiveLevel() for name in _DEPENDENCIES}
    seen["absl"] = logging.get_verbosity()
    py_logging.getLogger("ctxrq_jax.recipes.demo").warning("resuming from step %d", 4)
    py_logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")  # dependency chatter
    # JAX's fallback on a GPU host without the CUDA plugin (jax/_src/xla_bridge.py): the one dependency warning kept.
    py_logging.getLogger("jax._src.xla_bridge").warning(
        "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed. Falling back to "
        "cpu.")

  define = lambda: flags.DEFINE_integer("n", 1, "a number")  # noqa: E731
  assert run(main, define, "stage2", "--n=3") == (None, [
      "warning: resuming from step 4", "warning: An NVIDIA GPU may be present on this machine, but a CUDA-enabled "
      "jaxlib is not installed. Falling back to cpu."])
  # The library's own warnings as plain lines, dependencies (absl's logger included) below ERROR silenced.
  assert seen == {"argv": ["prog", "stage2"], "n": 3, "levels": dict.fromkeys(_DEPENDENCIES, py_logging.ERROR),
                  "absl": logging.ERROR}
  assert "n" not in flags.FLAGS  # the fixture's clean-up: the next call may define it again


# ------------------------------------------------------------------------------- mistakes found parsing the flags
def test_a_bad_flag_value_is_one_line(run):
  define = lambda: flags.DEFINE_integer("max_examples", None, "digits", lower_bound=1)  # noqa: E731
  assert run(_raising(AssertionError("main ran")), define, "--max_examples=0") == (
      2, ["error: flag --max_examples=0: 0 is not a positive integer"])


def test_a_misspelt_config_key_is_one_line_naming_it(run):
  code, lines = run(train.main, train.define_flags, f"--config={REPO}/configs/demo.py", "--config.train.batch_sise=8",
                    "--workdir=x")
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith("error: a config override names no config key: ") and "batch_sise" in lines[0], lines


def test_a_json_config_is_one_line_asking_for_a_python_file(run, tmp_path, monkeypatch):
  # A run's config.json snapshot passed as --config (true/false/null make it no Python).
  snapshot = configlib.save_snapshot(configlib.load_config_file("demo"), str(tmp_path))
  code, lines = run(train.main, train.define_flags, f"--config={snapshot}", "--workdir=x")
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith("error: could not parse the command line (NameError: ") and lines[0].endswith(
      "a --config must be a Python file with get_config(), e.g. configs/demo.py"), lines
  # JSON without true/false/null is valid Python: it loads, and then has no get_config() (it used to be reported as
  # a config override naming no key).
  plain = tmp_path / "plain.json"
  plain.write_text('{"seed": 0}')
  # ml_collections executes a --config file into the module of that name, which an earlier test's config (loaded in
  # this process) would still fill with its get_config(); a real command loads one config.
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  assert run(train.main, train.define_flags, f"--config={plain}", "--workdir=x") == (2, [
      "error: a --config must be a Python file with get_config(), e.g. configs/demo.py; the one given defines none"])


# ------------------------------------------------------------------------------- mistakes the commands' main finds
def test_demo_refuses_config_overrides_it_would_ignore(run):
  code, lines = run(demo.main, demo.define_flags, "--workdir=x", "--smoke", "--stage2_config.train.num_steps=9")
  assert (code, lines) == (2, ["error: --smoke uses the demo's own smoke configs; leave out "
                               "--stage1_config/--stage2_config"])
  code, lines = run(demo.main, demo.define_flags, "--workdir=x", "--task=text", "--stage2_config.train.num_steps=9")
  assert (code, lines) == (2, ["error: --stage2_config.KEY=VALUE overrides apply to configs/demo.py unless a config "
                               "is given; for --task=text pass --stage2_config=configs/demo_text.py before them"])


def test_sample_and_evaluate_name_a_workdir_that_is_no_run(run, tmp_path):
  missing = tmp_path / "missing" / "stage2"
  assert run(sample.main, sample.define_flags, f"--workdir={missing}") == (
      2, [f"error: workdir {missing} does not exist"])
  codes = tmp_path / "codes"  # a directory, but not a training run's
  codes.mkdir()
  assert run(evaluate.main, evaluate.define_flags, "stage2", f"--workdir={codes}") == (
      2, [f"error: {codes / 'config.json'} not found: is {codes} the workdir of a training run?"])


def test_sample_inpaint_names_a_mask_of_another_size(run, tmp_path):
  # Read before the run is loaded (here: there is none); the message's text is test_editing's.
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "digit.png")
  Image.fromarray(np.full((20, 28), 255, np.uint8)).save(tmp_path / "mask.png")
  image, mask = tmp_path / "digit.png", tmp_path / "mask.png"
  assert run(sample.main, sample.define_flags, "inpaint", f"--workdir={tmp_path}/run", f"--image={image}",
             f"--mask={mask}", "--class=1") == (
      2, [f"error: mask {mask} is 28x20 pixels but image {image} is 28x28; draw the mask on the image's pixels"])


def test_sample_keeps_an_earlier_edit_and_needs_a_directory_as_out(run, tmp_path):
  # Checked before the run is loaded (there is none here: with --overwrite the next check names the missing workdir).
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "digit.png")
  Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "mask.png")
  out = tmp_path / "edit"
  out.mkdir()
  (out / "inpaint.npz").write_bytes(b"an earlier edit")
  args = ("inpaint", f"--workdir={tmp_path}/run", f"--image={tmp_path}/digit.png", f"--mask={tmp_path}/mask.png",
          "--class=1", f"--out={out}")
  assert run(sample.main, sample.define_flags, *args) == (
      2, [f"error: {out / 'inpaint.npz'} exists (an earlier edit); pass --overwrite to replace it, or choose another "
          "--out"])
  assert (out / "inpaint.npz").read_bytes() == b"an earlier edit"
  assert run(sample.main, sample.define_flags, *args, "--overwrite") == (
      2, [f"error: workdir {tmp_path}/run does not exist"])
  # --out naming a file (samples.npz for its directory): refused before anything is drawn.
  file_out = f"--out={out / 'inpaint.npz'}"
  for command in (args[:-1], (f"--workdir={tmp_path}/run", "--classes=1")):  # `sample inpaint`, `sample`
    assert run(sample.main, sample.define_flags, *command, file_out) == (
        2, [f"error: {file_out} is a file; --out names a directory (the outputs are written inside it)"])


def test_convert_names_flags_its_converter_ignores_and_paths_it_cannot_use(run, tmp_path):
  """Checked before torch or a converter is imported: nothing is read but the paths."""
  stage1 = tmp_path / "stage1"  # the released layout: stage1/model.pt beside stage1/config.yaml
  stage1.mkdir()
  (stage1 / "model.pt").write_bytes(b"not read")
  common = (f"--checkpoint={stage1 / 'model.pt'}", f"--out={tmp_path / 'out'}")
  cases = [
      (("inception", *common, "--use_ema"), "--use_ema applies to `convert rqvae` only, not to `convert inception`"),
      (("clip", *common, f"--reference_config={stage1}/config.yaml"),
       "--reference_config applies to `convert rqvae` only, not to `convert clip`"),
      # A bool flag given with its default value is still given (absl's `present`), and named as it was given.
      (("rqvae", *common, "--nocheck_hash"),
       "--nocheck_hash applies to `convert inception / clip` only, not to `convert rqvae`"),
      (("rqvae", *common, "--check_hash"),
       "--check_hash applies to `convert inception / clip` only, not to `convert rqvae`"),
      (("inception", *common, "--use_ema", "--allow_pickle=false"), "--use_ema applies to `convert rqvae` only; "
       "--noallow_pickle applies to `convert rqvae` only, not to `convert inception`"),
      # A directory is said to be one (not "does not exist"), whatever flags rqvae reads come with it.
      (("rqvae", f"--checkpoint={stage1}", f"--out={tmp_path / 'out'}", "--use_ema", "--allow_pickle"),
       f"--checkpoint={stage1} is a directory; name the checkpoint file in it (e.g. {stage1 / 'model.pt'})"),
      # A config the user named is missing: that file, not advice about where the default lies.
      (("rqvae", *common, f"--reference_config={tmp_path / 'cfg.yaml'}"),
       f"--reference_config={tmp_path / 'cfg.yaml'} does not exist"),
      (("rqvae", *common, f"--reference_config={tmp_path}"),
       f"--reference_config={tmp_path} is a directory, not a config.yaml file"),
      (("rqvae", *common), f"{stage1 / 'config.yaml'} does not exist: the reference's config.yaml lies beside its "
       "checkpoint; name it with --reference_config=FILE otherwise"),
  ]
  for args, message in cases:
    assert run(convert.main, convert.define_flags, *args) == (2, [f"error: {message}"]), args
  done = tmp_path / "done"  # an earlier conversion: refused before the checkpoint is read, not after converting it
  (done / "variables").mkdir(parents=True)
  for converter in ("rqvae", "inception", "clip"):
    assert run(convert.main, convert.define_flags, converter, common[0], f"--out={done}") == (
        2, [f"error: {done} already holds an artifact; pass --overwrite to replace it, or choose another --out"])


def test_sample_keeps_an_earlier_set_and_records_the_settings_of_each(run, tmp_path, monkeypatch):
  # `sample` used to replace OUT/samples.npz (a 50k-sample FID set) by any later run, recording no settings, and the
  # old set's samples.fid.json stayed beside the new one. The run is a stand-in (no model is built or compiled):
  # `sample_codes` draws zeros, the RQ-VAE decodes them to black 8x8 images.
  def images(codes, *, uint8=False, out=None):
    del uint8
    black = np.zeros((len(codes), 8, 8, 3), np.uint8)
    if out is None:
      return black
    out[...] = black
    return out

  config = configlib.load_config_file("demo", "smoke")
  fake = lambda workdir, use_ema: types.SimpleNamespace(  # noqa: E731
      workdir=workdir, config=config, step=8, params_name="ema_params", model=types.SimpleNamespace(is_text=False),
      code_shape=(8, 8, 4), resolution=8, images=images)
  monkeypatch.setattr(loader, "Stage2Model", fake)
  monkeypatch.setattr(runner, "sample_codes", lambda loaded, labels, rng, *, num_revisions, **kw: np.zeros(
      (num_revisions + 1, len(labels), 64, 4), np.int32))
  out = tmp_path / "samples"
  args = (f"--workdir={tmp_path}/run", f"--out={out}", "--num_per_class=2")
  assert run(sample.main, sample.define_flags, *args, "--classes=0,1,2") == (None, [])
  settings = json.loads((out / "samples.json").read_text())
  assert (settings["classes"], settings["per_class"], settings["num_samples"], settings["seed"]) == ([0, 1, 2], 2, 6, 0)
  assert (settings["step"], settings["params"], settings["T_draft"], settings["M"]) == (
      8, "ema_params", config.sample.T_draft, config.sample.M)
  assert settings["revise"]["guidance_scale"] == config.sample.revise.guidance
  (out / "samples.fid.json").write_text('{"fid": 1.0}')  # `evaluate fid`'s result for this set
  before = (out / "samples.npz").read_bytes()
  assert run(sample.main, sample.define_flags, *args, "--classes=3") == (
      2, [f"error: {out / 'samples.npz'} exists (an earlier sample set); pass --overwrite to replace it, or choose "
          "another --out"])
  assert (out / "samples.npz").read_bytes() == before and (out / "samples.fid.json").exists()
  assert run(sample.main, sample.define_flags, *args, "--classes=3", "--seed=7", "--overwrite") == (None, [])
  with np.load(out / "samples.npz") as f:
    assert f["labels"].tolist() == [3, 3]
  settings = json.loads((out / "samples.json").read_text())
  assert (settings["classes"], settings["num_samples"], settings["seed"]) == ([3], 2, 7)
  assert not (out / "samples.fid.json").exists()  # it described the set the new one replaced


def test_flags_the_chosen_subcommand_ignores_are_named(run, tmp_path):
  # Checked first, before anything is read: `sample --class=3` (for --classes=3) drew every class, `sample inpaint
  # --merge` merged shards instead of painting, `evaluate samples --samples=X.npz` drew its own samples.
  w = f"--workdir={tmp_path}"
  cases = [
      (sample, (w, "--class=3"), "--class applies to `sample inpaint` only, not to `sample`"),
      (sample, ("inpaint", w, "--merge", "--batch_size=4", "--classes=1"),
       "--classes applies to `sample` only; --batch_size applies to `sample` only; --merge applies to `sample` or "
       "`sample --merge` only, not to `sample inpaint`"),
      (sample, (w, "--image=x.png"), "--image applies to `sample inpaint` only, not to `sample`"),
      (sample, ("--merge", f"--out={tmp_path}", "--seed=3"),
       "--seed applies to `sample` or `sample inpaint` only, not to `sample --merge`"),
      (evaluate, ("samples", w, f"--samples={tmp_path}/x.npz"),
       "--samples applies to `evaluate fid / clip` only, not to `evaluate samples`"),
      (evaluate, ("fid", "--seed=3"),
       "--seed applies to `evaluate stage2 / samples / ablation / text_samples` only, not to `evaluate fid`"),
      (evaluate, ("stage2", w, "--samples_per_class=5"),
       "--samples_per_class applies to `evaluate samples / ablation` only, not to `evaluate stage2`"),
      (encode, ("encode", "--artifact=a", "--out=o", "--resize=squash"),
       "--resize applies to `encode captions` only, not to `encode encode`"),
      (encode, ("captions", "--artifact=a", "--out=o", "--config=configs/rqvae_mnist.py"),
       "--config applies to `encode encode` only, not to `encode captions`"),
  ]
  for module, args, message in cases:
    assert run(module.main, module.define_flags, *args) == (2, [f"error: {message}"]), args


def test_class_ids_outside_the_model_are_named():
  # `sample --classes=3,12` on a 10-class run (which this needs: test_install checks it from the wheel).
  assert runner.parse_classes("3,1", 10) == [3, 1] and runner.parse_classes("all", 3) == [0, 1, 2]
  with pytest.raises(ValueError, match=r"^class ids \[12\] are outside \[0, 10\) for this model$"):
    runner.parse_classes("3,12", 10)
  with pytest.raises(ValueError, match=r"class ids ' , ' are outside"):
    runner.parse_classes(" , ", 10)


@pytest.mark.slow  # an Inception at 75 px and a tiny CLIP compile
def test_evaluate_reference_stats_fid_and_clip_write_what_the_library_computes(run, tmp_path, monkeypatch):
  """The three evaluation commands that need released weights, end to end through their mains on random ones: a
  reference file from the embedded digits, FID of its own images against it (0, precision = recall = 1), and the CLIP
  score of a prompts file as the library computes it."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.data import clip_tokenizer  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.evaluation import inception_features  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import clip  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import clip_convert  # pylint: disable=g-import-not-at-top
  from ctxrq_jax.models import inception_convert  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(inception_features, "InceptionFeatureExtractor", functools.partial(
      inception_features.InceptionFeatureExtractor, image_size=75))  # 299 px costs 16x the time, proves nothing more
  inception = str(tmp_path / "inception")
  inception_convert.save_artifact(inception, inception_convert.convert_state_dict(
      inception_convert.random_state_dict(0)))
  ref = tmp_path / "ref.npz"
  config = os.path.join(REPO, "configs", "rqvae_mnist.py")
  code, err = run(evaluate.main, evaluate.define_flags, "reference-stats", f"--config={config}", "--split=test",
                  "--num_images=6", "--keep_images=6", "--batch_size=4", f"--inception={inception}", f"--out={ref}")
  assert code is None and err[-1].startswith("reference-stats: 6/6 images"), err
  with np.load(ref) as f:
    images = f["arr_0"]
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8 and np.ptp(images) > 0
  assert (images[..., :1] == images).all()  # the grey digits repeated to RGB
  samples = tmp_path / "same.npz"
  np.savez(samples, arr_0=images[::-1])
  code, err = run(evaluate.main, evaluate.define_flags, "fid", f"--samples={samples}", f"--reference={ref}",
                  f"--inception={inception}", "--batch_size=4")
  assert code is None and err[-1].startswith("inception features: 12/12 images"), err
  results = json.loads((tmp_path / "same.fid.json").read_text())
  assert abs(results["fid"]) < 1e-3 and (results["precision"], results["recall"]) == (1.0, 1.0)
  assert results["inception_score"] >= 1.0 - 1e-6

  vocab = tmp_path / clip_tokenizer.VOCAB_FILENAME
  with gzip.open(vocab, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n")
  tokenizer = clip_tokenizer.CLIPTokenizer(str(vocab), context_length=clip.TINY.context_length)
  clip_config = dataclasses.replace(clip.TINY, vocab_size=tokenizer.vocab_size)
  params = clip_convert.convert_state_dict(clip_convert.random_state_dict(clip_config, seed=0), clip_config)
  clip_convert.save_artifact(str(tmp_path / "clip"), clip_config, params)
  prompts = tmp_path / "prompts.npz"
  np.savez(prompts, arr_0=np.random.default_rng(0).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8),
           prompts=np.array(["a cat", "a dog"]), labels=np.array([0, 1, 1, 0, 1], np.int32))
  code, err = run(evaluate.main, evaluate.define_flags, "clip", f"--samples={prompts}",
                  f"--weights={tmp_path / 'clip'}", f"--clip_vocab={vocab}", "--batch_size=4")
  assert code is None and err[-1].startswith("clip score: 5/5 images"), err
  got = json.loads((tmp_path / "prompts.clip.json").read_text())
  want = clip_score.evaluate(clip_score.CLIPEmbedder(clip_config, params, batch_size=4), tokenizer, str(prompts))
  np.testing.assert_allclose(got["clip_score"], want["clip_score"], rtol=1e-6)
  assert got["num_images"] == 5 and got["num_captions"] == 2
