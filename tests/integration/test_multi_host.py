"""The pipeline as a multi-host job: two real JAX processes (jax.distributed on CPU, a coordinator on localhost).

They encode their shares into one code dataset (it reads back equal, record for record, to a one-process encode),
train stage 2 on it for one step and stop, resume to two steps (each host's data-iterator state in the
checkpoint), and draw a sample set, each host its block (equal to the set one process draws)."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ctxrq_jax.data import code_captions
from ctxrq_jax.data import codes as code_data
from ctxrq_jax.data import tokenizer as tokenizer_lib
from ctxrq_jax.models import artifact as artifact_lib
from ctxrq_jax.models import rqvae
from ctxrq_jax.sampling import runner
from ctxrq_jax.stage1 import encode
from tests import helpers
from tests.unit.data import test_captions

pytestmark = pytest.mark.slow

_PROCESS = textwrap.dedent("""
    import sys
    from ctxrq_jax.core import host
    host.setup_host()  # joins the job from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    import jax
    from ctxrq_jax.data import captions, tokenizer
    from ctxrq_jax.stage1 import encode
    from tests import helpers
    assert jax.process_count() == 2
    tmp = sys.argv[1]
    data = helpers.tiny_stage1_config().data
    encode.encode_dataset(tmp + "/artifact", data, tmp + "/codes2", ["test"], batch_size=16, num_shards=2,
                          max_examples=37, views=("center", "crop"))
    files = captions.host_shard_paths(tmp + "/wds/*.tar", jax.process_index(), jax.process_count())
    tok = tokenizer.CaptionTokenizer.from_directory(tmp + "/bpe", context_length=6)
    encode.encode_captions(tmp + "/artifact", {"val": lambda stats: captions.iter_webdataset(files, stats)},
                           tmp + "/captions2", tok, train_splits=(), batch_size=16)

    from ctxrq_jax.sampling import runner
    from ctxrq_jax.stage2 import trainer
    config = helpers.tiny_demo_stage2_config()
    with config.unlocked():
      config.data.codes_dir, config.data.stage1_dir = tmp + "/codes2", tmp + "/artifact"
      config.data.train_split = config.data.eval_split = "test"
      config.train.num_steps, config.train.ckpt_every, config.train.eval_every = 2, 1, 100
    first = trainer.train_and_evaluate(config, tmp + "/run", stop_after_steps=1)
    assert first["step"] == 1 and first["stopped"], first
    resumed = trainer.train_and_evaluate(config, tmp + "/run")
    assert resumed["step"] == 2 and [s for s, _ in resumed["history"]] == [2], resumed["history"]
    runner.sample_all_classes(tmp + "/run", tmp + "/samples2", samples_per_class=1, classes="0,1,2")
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_encode_train_resume_and_sample(tmp_path, subprocess_env):
  config = helpers.tiny_stage1_config()
  model = rqvae.RQVAE.from_config(config.model)
  variables = jax.jit(rqvae.init_variables, static_argnums=0)(model, jax.random.key(3))
  artifact_lib.save_artifact(str(tmp_path / "artifact"), config.model, variables)
  texts = [f"a {c} {t} in the park" for c in ("red", "blue", "green") for t in ("dog", "cat", "bus")]
  pairs = [(f"{i:09d}", t) for i, t in enumerate(texts)]
  (tmp_path / "wds").mkdir()
  test_captions.write_shard(tmp_path / "wds" / "00000.tar", test_captions.webdataset_members(pairs[:4]))
  test_captions.write_shard(tmp_path / "wds" / "00001.tar",
                            test_captions.webdataset_members(pairs[4:], corrupt={"000000006"}))
  tokenizer_lib.train_tokenizer(texts * 3, str(tmp_path / "bpe"), vocab_size=60)

  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(tmp_path)], cwd=helpers.REPO,
                            env=dict(subprocess_env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, "\n=====\n".join(o[-2500:] for o in outputs)

  # Class codes: process 0 encoded examples [0, 19), process 1 [19, 37), random crops drawn as in one pass.
  parts = code_data.read_metadata(str(tmp_path / "codes2"))
  assert parts.part_sizes("test") == (19, 18) and len(parts.shard_files("test")) == 4
  one = encode.encode_dataset(str(tmp_path / "artifact"), config.data, str(tmp_path / "codes1"), ["test"],
                              batch_size=16, num_shards=2, max_examples=37, views=("center", "crop"))
  assert one.num_examples("test") == 37 and one.part_sizes("test") == (37,)
  for view in (0, 1):
    got, want = (code_data.load_codes(str(tmp_path / d), "test", view=view) for d in ("codes2", "codes1"))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])

  # Captions: each process read its own tar file; records and captions in file order, the bad image skipped.
  caps = code_data.read_metadata(str(tmp_path / "captions2"))
  assert caps.part_sizes("val") == (4, 4)
  assert code_captions.read_captions(str(tmp_path / "captions2"), "val") == texts[:6] + texts[7:]
  tok = tokenizer_lib.CaptionTokenizer.from_directory(str(tmp_path / "bpe"), context_length=6)
  np.testing.assert_array_equal(code_data.load_codes(str(tmp_path / "captions2"), "val")[1],
                                tok.encode(texts[:6] + texts[7:]))

  # Stage 2: every host's data-iterator position is in the checkpoint; the sample set equals one drawn by one process.
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / "2" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert sorted(os.listdir(tmp_path / "samples2" / "shards")) == ["samples-00000-of-00002.npz",
                                                                   "samples-00001-of-00002.npz"]
  runner.sample_all_classes(str(tmp_path / "run"), str(tmp_path / "samples1"), samples_per_class=1, classes="0,1,2")
  with np.load(tmp_path / "samples2" / "samples.npz") as two, np.load(tmp_path / "samples1" / "samples.npz") as one:
    assert sorted(two.files) == sorted(one.files)
    for key in one.files:
      np.testing.assert_array_equal(two[key], one[key])
