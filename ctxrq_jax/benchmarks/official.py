"""The official PyTorch RQ-Transformer (kakaobrain/rq-vae-transformer) at our dims: the baseline of `bench`.

`time_sampler` times its autoregressive sampler (`RQTransformer.sample`: causal spatial and depth transformers with
key/value caches, one code at a time), `time_train_step` one training step (forward, cross-entropy over all codes,
backward, AdamW), both with random weights on this machine's CPU (or the first CUDA device when torch sees one).

The source is read from a checkout given by path (`bench --baseline_src=PATH`); nothing is downloaded. Only the
model files are loaded (rqvae/models/rqtransformer/{attentions,primitives,transformers}.py and the helpers they
import); the OmegaConf config classes are replaced by a plain namespace (they do not import on Python >= 3.11 and
need omegaconf), and the RQ-VAE, of which the sampler only needs the code embedding, by an embedding lookup in a
random [K, n_z] codebook. torch comes from the `torch` extra (`pip install .[torch]`).

Settings follow the official throughput script (measure_throughput/__main__.py): temperature 1, no top-k / top-p,
no AMP, a class condition per sample.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import time
import types
import warnings
from typing import Any

_PACKAGES = ('rqvae', 'rqvae.models', 'rqvae.models.rqtransformer', 'rqvae.utils', 'rqvae.optimizer')


class _Namespace(types.SimpleNamespace):
  """Stands in for the OmegaConf configs: attribute access and copy()."""

  def copy(self) -> '_Namespace':
    return copy.deepcopy(self)


def load_transformer_class(src: str) -> type:
  """The `RQTransformer` class of the checkout at `src` (its package __init__ files are not run)."""
  root = os.path.join(os.path.abspath(src), 'rqvae')
  if not os.path.isfile(os.path.join(root, 'models', 'rqtransformer', 'transformers.py')):
    raise FileNotFoundError(f'{src} is not a checkout of kakaobrain/rq-vae-transformer '
                            '(no rqvae/models/rqtransformer/transformers.py)')
  loaded = sys.modules.get('rqvae')
  if loaded is not None and getattr(loaded, '__path__', [None])[0] != root:
    raise ValueError(f'another rqvae package is already imported ({loaded.__path__}); run the baseline alone')
  for name in _PACKAGES:  # bare packages: their __init__ imports the RQ-VAE, the optimizers, OmegaConf
    if name not in sys.modules:
      module = types.ModuleType(name)
      module.__path__ = [os.path.join(root, *name.split('.')[1:])]
      sys.modules[name] = module
  configs = types.ModuleType('rqvae.models.rqtransformer.configs')
  configs.AttentionBlockConfig = configs.AttentionStackConfig = configs.RQTransformerConfig = _Namespace
  sys.modules.setdefault(configs.__name__, configs)
  return importlib.import_module('rqvae.models.rqtransformer.transformers').RQTransformer


def official_config(config: Any) -> _Namespace:
  """The official model config at the dims of our stage-2 `config` (width, heads, layers, K, code shape, n_z)."""
  m, d = config.model, config.data
  block = lambda: _Namespace(embed_dim=int(m.width), n_head=int(m.num_heads), mlp_bias=True, attn_bias=True,  # noqa
                             attn_pdrop=0.0, resid_pdrop=float(m.dropout), gelu='v1')
  return _Namespace(
      type='rq-transformer', block_size=list(int(v) for v in d.code_shape), vocab_size=int(d.vocab_size),
      embed_dim=int(m.width), input_embed_dim=int(d.embed_dim), shared_tok_emb=True, shared_cls_emb=True,
      input_emb_vqvae=True, head_emb_vqvae=True, cumsum_depth_ctx=True, use_padding_emb=False,
      scaled_head_emb_vqvae=False, vocab_size_cond=int(m.num_classes) + 1, block_size_cond=1,
      embd_pdrop=float(m.dropout), body=_Namespace(n_layer=int(m.spatial_layers), block=block()),
      head=_Namespace(n_layer=int(m.depth_layers), block=block()))


def build(src: str, config: Any, seed: int) -> tuple[Any, Any, Any]:
  """(model, model_aux, device): the official RQ-Transformer and a codebook stand-in for the RQ-VAE, random weights."""
  import torch  # pylint: disable=g-import-not-at-top

  class CodeEmbedding(torch.nn.Module):
    """What the sampler uses of the RQ-VAE: per-depth code embeddings [..., D, n_z] from a shared codebook."""

    def __init__(self, vocab: int, dim: int):
      super().__init__()
      self.register_buffer('codebook', torch.randn(vocab, dim))

    def get_code_emb_with_depth(self, code):
      return torch.nn.functional.embedding(code, self.codebook), None

  # The checkout's `torch.cuda.amp.autocast` warns on every call with recent torch.
  warnings.filterwarnings('ignore', category=FutureWarning, message='.*autocast.*')
  torch.manual_seed(seed)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = load_transformer_class(src)(official_config(config)).to(device)
  aux = CodeEmbedding(int(config.data.vocab_size), int(config.data.embed_dim)).to(device)
  return model, aux, device


def _sync(device: Any) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def time_sampler(src: str, config: Any, *, batch: int, repeats: int, seed: int) -> float:
  """Seconds per batch of the official autoregressive sampler (one warm-up call, then the fastest of `repeats`)."""
  import torch  # pylint: disable=g-import-not-at-top
  model, aux, device = build(src, config, seed)
  model.eval()
  h, w, d = (int(v) for v in config.data.code_shape)
  empty = torch.zeros(batch, h, w, d, dtype=torch.long, device=device)
  gen = torch.Generator().manual_seed(seed)
  cond = torch.randint(0, int(config.model.num_classes), (batch, 1), generator=gen).to(device)
  with torch.no_grad():
    model.sample(empty, model_aux=aux, cond=cond)  # warm up
    _sync(device)
    best = float('inf')
    for _ in range(max(1, repeats)):
      start = time.perf_counter()
      codes = model.sample(empty, model_aux=aux, cond=cond)
      _sync(device)
      best = min(best, time.perf_counter() - start)
  assert codes.shape == (batch, h, w, d)
  return best


def time_train_step(src: str, config: Any, *, batch: int, repeats: int, seed: int) -> dict[str, Any]:
  """One official training step: forward (teacher-forced, all codes), cross-entropy, backward, AdamW.

  Returns {'batch', 'step_s' (the fastest of `repeats` after a warm-up), 'loss'}; AdamW with the config's learning rate, betas and weight decay.
  """
  import torch  # pylint: disable=g-import-not-at-top
  model, aux, device = build(src, config, seed)
  model.train()
  o = config.optim
  opt = torch.optim.AdamW(model.parameters(), lr=float(o.learning_rate), betas=(float(o.b1), float(o.b2)),
                          weight_decay=float(o.weight_decay))
  h, w, d = (int(v) for v in config.data.code_shape)
  gen = torch.Generator().manual_seed(seed)
  vocab, classes = int(config.data.vocab_size), int(config.model.num_classes)

  def step() -> float:
    codes = torch.randint(0, vocab, (batch, h, w, d), generator=gen).to(device)
    cond = torch.randint(0, classes, (batch, 1), generator=gen).to(device)
    logits = model(codes, model_aux=aux, cond=cond)
    loss = model.compute_loss(logits, codes)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(o.grad_clip))
    opt.step()
    return float(loss.detach())

  step()  # warm up
  _sync(device)
  best = float('inf')
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    loss = step()  # float(loss) waits for the step
    _sync(device)
    best = min(best, time.perf_counter() - start)
  return {'batch': batch, 'step_s': best, 'loss': loss}
