"""CLIP's tokenizer against open_clip's (OpenAI's SimpleTokenizer), on the vocabulary file shipped in open_clip."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from ctxrq_jax.data import clip_tokenizer
from tests import clip_reference as ref

CAPTIONS = [
    "A red bus on a city street.",
    "it's 3:45pm -- isn't it?! They'll say we've won, I'm sure you'd agree",
    "Ünïcödé café naïve résumé Ölçü ПРИВЕТ мир ελληνικά العربية",
    "日本語のキャプション 漢字 한국어",
    "emoji 🎉🐶 and 👩‍👩‍👧 and ❤️",
    "  lots   of\twhitespace\n here \u00a0nbsp\u2003emspace ",
    "&amp;lt;b&amp;gt; &quot;quoted&quot; &#39;entity&#39;",  # HTML entities, unescaped twice
    "“curly quotes” and ‘single’ — dash… ﬁne ligature ｆｕｌｌｗｉｄｔｈ",  # ftfy's fixes
    "Ã©mojibake cafÃ© seÃ±or",  # mojibake that ftfy repairs
    "MiXeD CaSe WORDS 12345 3.14159 1st 2nd 100th $9.99 50%",
    "#hashtag @user http://example.com/a?b=c&d=e_f",
    "dog's ''s ''' !!! ?!?",
    "",
    "a" * 300,  # one long word: BPE pieces
    " ".join(["photograph"] * 100),  # truncated to 77 ids, the last one EOT
]


@pytest.fixture(scope="module")
def tokenizers():
  open_clip = ref.import_open_clip()
  path = ref.vocab_path()
  del open_clip
  from open_clip.tokenizer import SimpleTokenizer  # pylint: disable=g-import-not-at-top
  return clip_tokenizer.CLIPTokenizer(path), SimpleTokenizer(path)


def test_ids_equal_open_clips(tokenizers):
  ours, theirs = tokenizers
  got = ours.encode(CAPTIONS)
  want = theirs(CAPTIONS, context_length=clip_tokenizer.CONTEXT_LENGTH).numpy()
  assert got.dtype == np.int32 and got.shape == (len(CAPTIONS), 77)
  for caption, a, b in zip(CAPTIONS, got, want):
    np.testing.assert_array_equal(a, b, err_msg=repr(caption))
  assert ours.vocab_size == 49408 and (ours.sot_id, ours.eot_id) == (49406, 49407)
  # Truncation keeps 75 ids between SOT and EOT; the empty caption is SOT EOT.
  assert got[-1, 0] == 49406 and got[-1, -1] == 49407 and (got[-1] != 0).all()
  np.testing.assert_array_equal(got[CAPTIONS.index("")][:3], [49406, 49407, 0])
  assert ours.decode(got[0]) == "a red bus on a city street ."


def test_special_tokens_in_the_text_are_openais(tokenizers):
  """OpenAI's pattern matches <|startoftext|> and <|endoftext|> in the text itself (open_clip names its special
  tokens differently, so it is no oracle here): the text's EOT is the first largest id, where the text tower pools."""
  ours, _ = tokenizers
  row = ours.encode(["x<|endoftext|>y"])[0]
  x, y = ours.token_ids(["x", "y"])
  np.testing.assert_array_equal(row[:6], [49406, *x, 49407, *y, 49407, 0])


def test_small_vocabulary_file(tmp_path):
  """The vocabulary layout on a hand-made file: 256 byte symbols, the same with </w>, the merges, SOT, EOT."""
  path = tmp_path / clip_tokenizer.VOCAB_FILENAME
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\nh i</w>\nt h\nth e</w>\n")
  tok = clip_tokenizer.CLIPTokenizer(tmp_path, context_length=6)  # a directory holding the file
  assert tok.vocab_size == 512 + 3 + 2
  sym = clip_tokenizer.byte_symbols()
  assert sym[ord("a")] == "a" and sym[0] == "\u0100" and sym[ord(" ")] == "\u0120"
  row = tok.encode(["The hi, thee!"])[0]
  # 'the</w>' (merge 3 -> id 514), 'hi</w>' (512), ',</w>', 'th' (513) 'e' 'e</w>', '!</w>'; truncated to 6.
  comma_w = 256 + 11  # ',' is the 12th printable byte ('!' is the 1st)
  np.testing.assert_array_equal(row, [515, 514, 512, comma_w, 513, 516])
  with pytest.raises(FileNotFoundError, match=r"bpe_simple_vocab_16e6\.txt\.gz.*open_clip"):
    clip_tokenizer.CLIPTokenizer(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="--clip_vocab"):
    clip_tokenizer.require_vocab_file(None)
