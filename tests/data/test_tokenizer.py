"""Tests of the text tokenizer: training, round trips, sequences, dataset cache, HF export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vlm_jax.data import tokenizer as T, tokenizer_source
from vlm_jax.data.builders import shapes, shapes_scene as S
from vlm_jax.errors import UserError
from vlm_jax.hf.tokenizer import hf_fast_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shapes_texts(split="train", n=200):
  """Captions, questions and answers of the first n examples of a split (no pixels needed)."""
  captions, questions, answers = [], [], []
  for i in range(n):
    ex = S.make_example(S.SPLIT_IDS[split], i, image_size=8)
    captions.append(ex["caption"])
    questions += [p["question"] for p in ex["qa"]]
    answers += [p["answer"] for p in ex["qa"]]
  return captions, questions, answers


@pytest.fixture(scope="module")
def texts():
  c, q, a = _shapes_texts()
  return c + q + a


@pytest.fixture(scope="module")
def tok(texts):
  return T.train_tokenizer(texts, vocab_size=1000)


def test_module_does_not_import_jax_or_tensorflow():
  code = ("import sys, vlm_jax.data.tokenizer; "
          "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'tensorflow', 'flax')]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_special_ids_distinct_and_pad_zero(tok):
  ids = [tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.unk_id, tok.sep_id]
  assert tok.pad_id == 0
  assert len(set(ids)) == len(ids)
  assert ids == [T.PAD_ID, T.BOS_ID, T.EOS_ID, T.MASK_ID, T.UNK_ID, T.SEP_ID]
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.special_ids == frozenset(ids)


@pytest.mark.parametrize("kind", T.KINDS)
def test_round_trip_of_shapes_texts(kind, texts):
  tok = T.train_tokenizer(texts, vocab_size=1000, kind=kind)
  # Held-out examples: validation-split captions and questions.
  c, q, a = _shapes_texts("validation", 50)
  for text in c + q + a:
    ids = tok.encode(text)
    assert ids and tok.unk_id not in ids, text
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == T.normalize_text(text) == text
  # Whole words of the shapes vocabulary are single tokens.
  assert len(tok.encode("a big purple diamond on the left")) == 7


def test_decode_normalises_and_stops_at_eos(tok):
  messy = "  A Large RED circle   on the left ,a small  Square?"
  assert T.normalize_text(messy) == "a large red circle on the left ,a small square?"
  assert tok.decode(tok.encode(messy)) == T.normalize_text(messy)
  ids = tok.encode("a red circle")
  row = [tok.bos_id] + ids + [tok.eos_id] + tok.encode("junk after eos") + [tok.pad_id] * 3
  assert tok.decode(np.array(row, np.int32)) == "a red circle"
  # Specials inside, and ids of a padded model vocabulary beyond the tokenizer, are skipped.
  assert tok.decode([tok.mask_id] + ids + [tok.vocab_size + 7, tok.pad_id]) == "a red circle"
  assert tok.decode_batch([ids, []]) == ["a red circle", ""]
  assert tok.encode_batch(["a red circle", ""]) == [ids, []]


def test_training_is_deterministic(texts):
  first = T.train_tokenizer(texts, vocab_size=300).to_json()
  assert T.train_tokenizer(list(reversed(texts)), vocab_size=300).to_json() == first
  # The Rust trainers seed their hash maps per process: check across processes too.
  code = ("import sys; from vlm_jax.data import tokenizer as T; "
          "texts = sys.stdin.read().split('\\n'); "
          "sys.stdout.write(T.train_tokenizer(texts, vocab_size=300).to_json())")
  for _ in range(2):
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, input="\n".join(texts),
                         capture_output=True, text=True, check=True).stdout
    assert out == first


def test_save_load_and_errors(tok, tmp_path):
  path = tok.save(str(tmp_path / "tok.json"))
  again = T.Tokenizer.load(path)
  assert again.to_json() == tok.to_json()
  assert tok.save(str(tmp_path)) == str(tmp_path / T.TOKENIZER_FILE)
  assert T.Tokenizer.load(str(tmp_path)).encode("a red circle") == tok.encode("a red circle")

  with pytest.raises(UserError, match="does not exist"):
    T.Tokenizer.load(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(UserError, match="not a valid tokenizer.json"):
    T.Tokenizer.load(str(bad))
  # A valid tokenizer.json without our special tokens.
  data = json.loads(tok.to_json())
  data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != T.MASK]
  data["model"]["vocab"].pop(T.MASK)
  foreign = tmp_path / "foreign.json"
  foreign.write_text(json.dumps(data))
  with pytest.raises(UserError, match="lacks the special tokens <mask>"):
    T.Tokenizer.load(str(foreign))


def test_unknown_words_do_not_crash(tok, texts):
  q = "Is there a Zebra-crossing near the café, 42?"
  ids = tok.encode(q)
  assert ids and all(0 <= i < tok.vocab_size for i in ids)
  # Unseen ASCII words are spelled in known pieces; only "café" (é unseen) becomes <unk>.
  assert ids.count(tok.unk_id) == 1
  assert tok.decode(ids) == "is there a zebra-crossing near the, 42?"
  wordlevel = T.train_tokenizer(texts, kind="wordlevel")
  ids = wordlevel.encode(q)
  assert tok.unk_id in ids and wordlevel.decode(ids) == "is there a the,?"
  seqs = tok.vqa_sequences([q], ["yes"], max_len=32)
  assert seqs.tokens.shape == (1, 32)


def test_bad_arguments(texts):
  with pytest.raises(UserError, match="unknown tokenizer kind"):
    T.train_tokenizer(texts, kind="sentencepiece")
  with pytest.raises(UserError, match="too small"):
    T.train_tokenizer(texts, vocab_size=4)
  with pytest.raises(UserError, match="too short"):
    T.make_sequences([[5]], max_len=1)


def test_make_sequences_truncation_and_empty(tok):
  ids = [[10, 11, 12], [], list(range(6, 20))]
  tokens, truncated = T.make_sequences(ids, max_len=6)
  assert tokens.dtype == np.int32 and tokens.shape == (3, 6)
  assert truncated == 1
  np.testing.assert_array_equal(tokens, [
      [1, 10, 11, 12, 2, 0],
      [1, 2, 0, 0, 0, 0],
      [1, 6, 7, 8, 9, 2],  # cut content, EOS kept
  ])
  tokens, truncated = T.make_sequences(ids, max_len=5, bos=False, eos=True)
  assert truncated == 1 and tokens[2].tolist() == [6, 7, 8, 9, 2]
  tokens, truncated = T.make_sequences(ids, max_len=4, bos=True, eos=False)
  assert truncated == 1 and tokens[1].tolist() == [1, 0, 0, 0]
  # Through the tokenizer: an empty caption is just BOS EOS.
  tokens, truncated = tok.caption_sequences(["", "a red circle"], max_len=8)
  assert truncated == 0
  assert tokens[0].tolist() == [tok.bos_id, tok.eos_id] + [tok.pad_id] * 6
  assert tok.decode(tokens[1]) == "a red circle"


def test_vqa_mask_covers_answer_and_eos_only(tok):
  questions = ["what color is the large shape?", "how many objects are there?"]
  answers = ["purple", "bottom right"]
  seqs = tok.vqa_sequences(questions, answers, max_len=16)
  assert seqs.tokens.shape == (2, 16) and seqs.loss_mask.shape == (2, 15)
  assert seqs.truncated == 0
  targets = seqs.tokens[:, 1:]
  for row, (q, a) in enumerate(zip(questions, answers)):
    q_ids, a_ids = tok.encode(q), tok.encode(a)
    p = len(q_ids) + 2
    assert seqs.prompt_len[row] == p
    assert seqs.tokens[row, :p].tolist() == [tok.bos_id] + q_ids + [tok.sep_id]
    # The masked targets are exactly the answer followed by EOS.
    assert targets[row][seqs.loss_mask[row] == 1].tolist() == a_ids + [tok.eos_id]
    assert seqs.loss_mask[row].sum() == len(a_ids) + 1
    assert tok.decode(seqs.tokens[row, p:]) == a
  # Padding after EOS is never a target.
  assert not (seqs.loss_mask.astype(bool) & (targets == tok.pad_id)).any()
  # Prompts for decoding equal the training prompts.
  prompts, prompt_len = tok.prompt_sequences(questions, max_len=16)
  np.testing.assert_array_equal(prompt_len, seqs.prompt_len)
  for row in range(2):
    p = prompt_len[row]
    np.testing.assert_array_equal(prompts[row, :p], seqs.tokens[row, :p])
    assert (prompts[row, p:] == tok.pad_id).all()


def test_vqa_truncation_keeps_the_answer():
  q, a = list(range(10, 20)), [30, 31]
  seqs = T.prompt_answer_sequences([q, [40]], [a, [41]], max_len=8)
  assert seqs.truncated == 1
  # BOS + 3 question tokens + SEP + answer + EOS = 8.
  assert seqs.tokens[0].tolist() == [T.BOS_ID, 10, 11, 12, T.SEP_ID, 30, 31, T.EOS_ID]
  assert seqs.loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
  assert seqs.prompt_len.tolist() == [5, 3]
  # Even the answer is cut when it alone does not fit; EOS stays.
  seqs = T.prompt_answer_sequences([q], [list(range(50, 60))], max_len=6)
  assert seqs.tokens[0].tolist() == [T.BOS_ID, T.SEP_ID, 50, 51, 52, T.EOS_ID]
  assert seqs.loss_mask[0].tolist() == [0, 1, 1, 1, 1]
  assert seqs.truncated == 1


def test_tokenizer_for_dataset_trains_once_and_caches(data_dir, monkeypatch):
  tok = tokenizer_source.tokenizer_for_dataset("shapes/tiny", data_dir, vocab_size=500)
  path = os.path.join(data_dir, "shapes", "tiny", str(shapes.Shapes.VERSION), "tokenizer_wordpiece_v500.json")
  assert os.path.isfile(path)
  # Trained on the train split's captions, questions and answers.
  c, q, a = _shapes_texts("test", 20)
  for text in c + q + a:
    assert tok.unk_id not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
  mtime = os.stat(path).st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError("retrained although the tokenizer is cached")
  monkeypatch.setattr(T, "train_tokenizer", no_training)
  again = tokenizer_source.tokenizer_for_dataset("shapes/tiny", data_dir, vocab_size=500)
  assert again.to_json() == tok.to_json()
  assert os.stat(path).st_mtime_ns == mtime
  # Another vocabulary size is another file.
  with pytest.raises(AssertionError, match="retrained"):
    tokenizer_source.tokenizer_for_dataset("shapes/tiny", data_dir, vocab_size=501)


def test_hf_fast_tokenizer_round_trip(tok, tmp_path):
  from transformers import AutoTokenizer
  hf = hf_fast_tokenizer(tok)
  hf.save_pretrained(str(tmp_path))
  loaded = AutoTokenizer.from_pretrained(str(tmp_path))
  c, q, a = _shapes_texts("validation", 10)
  samples = c + q + ["Is there a Zebra-crossing, 42?"]
  for h in (hf, loaded):
    for name in ("bos", "eos", "pad", "unk", "mask", "sep"):
      assert getattr(h, f"{name}_token_id") == getattr(tok, f"{name}_id"), name
    for text in samples:
      ids = tok.encode(text)
      assert h(text, add_special_tokens=False)["input_ids"] == ids
      assert h(text)["input_ids"] == [tok.bos_id] + ids + [tok.eos_id]
      assert h.decode(h(text)["input_ids"], skip_special_tokens=True) == tok.decode(ids)
    # A question/answer pair encodes like prompt_answer_sequences.
    pair = h(q[0], a[0])["input_ids"]
    seqs = tok.vqa_sequences([q[0]], [a[0]], max_len=len(pair))
    assert pair == seqs.tokens[0].tolist()


def test_pipeline_counts_truncated_and_empty_texts(tok, capsys):
  """Empty captions tokenise to [BOS][EOS]; over-long ones are cut, counted and warned about once."""
  from vlm_jax.data import pipeline
  from vlm_jax.tasks.common import encode_captions

  rows = ["", "a red circle", "a small red circle to the left of a large blue square"]
  raw = np.zeros((3, 64), np.uint8)
  for i, t in enumerate(rows):
    raw[i, :len(t)] = np.frombuffer(t.encode(), np.uint8)
  stats = pipeline.TextStats()
  for _ in range(2):
    batch = encode_captions({"caption": raw.copy()}, tok, 6, True, stats)
  assert stats.seen == 6 and stats.truncated == 2
  assert batch["tokens"][0].tolist()[:3] == [tok.bos_id, tok.eos_id, tok.pad_id]
  assert batch["tokens"][2][-1] == tok.eos_id  # cut, EOS kept
  out = capsys.readouterr().out
  assert out.count("warning: texts longer than input.max_len=6") == 1
