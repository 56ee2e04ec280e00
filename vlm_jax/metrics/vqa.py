"""VQA accuracy with the answer normalisation of the official VQA evaluation.

Normalisation (applied to predictions and references alike, as the VQA README
states), in this order:
  1. newlines / tabs become spaces; surrounding whitespace is stripped;
  2. punctuation other than apostrophe, colon and period is deleted when the
     answer has that mark next to a space or contains a digit-comma-digit
     ("100,978" -> "100978"), and is replaced by a space otherwise
     ("black-and-white" -> "black and white");
  3. a period is removed unless a digit follows it ("3.5" stays);
  4. lowercase; number words "none", "zero" .. "ten" become digits; the
     articles "a", "an", "the" are dropped; contractions missing their
     apostrophe are restored ("dont" -> "don't"); words rejoin with one space.

Scoring (`vqa_accuracy`): with 4 or more references, the official rule: for
each reference, leave it out and take min(#matches among the others / 3, 1);
average over all references (for 10 answers: the average over the 10
choose-9 subsets). With 1 to 3 references the leave-one-out rule cannot reach
1.0, so the score is 1.0 if the normalised prediction equals any normalised
reference and 0.0 otherwise (exact match for a single reference).
"""

import itertools
import re
from typing import Sequence

# Deleted or turned into spaces; apostrophe, colon and period are not here.
_PUNCT = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_',
          '-', '>', '<', '@', '`', ',', '?', '!')
_DIGIT_COMMA_DIGIT = re.compile(r'\d,\d')
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r'\.(?!\d)')
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3',
                 'four': '4', 'five': '5', 'six': '6', 'seven': '7',
                 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = frozenset({'a', 'an', 'the'})

_CANONICAL_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
hadn't've hasn't haven't he'd he'd've he's how'd how'll how's i'd've i'm i've
isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
must've needn't not've o'clock oughtn't shan't she'd've she's should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's
who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've
""".split()
# Forms such as "we'll", "it's", "let's" are left out above: without the
# apostrophe they are ordinary words ("well", "its", "lets") and must not change.


def _contraction_fixes() -> dict:
  """Maps every spelling missing one or more apostrophes to the full form."""
  fixes = {}
  for word in _CANONICAL_CONTRACTIONS:
    pieces = word.split("'")
    for kept in itertools.product((True, False), repeat=len(pieces) - 1):
      if all(kept):
        continue
      variant = pieces[0]
      for keep, piece in zip(kept, pieces[1:]):
        variant += ("'" if keep else '') + piece
      fixes[variant] = word
  return fixes


_CONTRACTION_FIXES = _contraction_fixes()


def _process_punctuation(text: str) -> str:
  delete = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for p in _PUNCT:
    if delete or (p + ' ') in text or (' ' + p) in text:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  return _PERIOD_NOT_BEFORE_DIGIT.sub('', out)


def normalize_answer(answer: str) -> str:
  """The official VQA answer normalisation (see the module docstring)."""
  text = answer.replace('\n', ' ').replace('\t', ' ').strip()
  text = _process_punctuation(text)
  words = []
  for word in text.lower().split():
    word = _NUMBER_WORDS.get(word, word)
    if word not in _ARTICLES:
      words.append(_CONTRACTION_FIXES.get(word, word))
  return ' '.join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
  """VQA accuracy of one predicted answer (see the module docstring)."""
  if isinstance(references, str) or len(references) == 0:
    raise ValueError('references must be a non-empty list of answer strings')
  pred = normalize_answer(prediction)
  is_match = [normalize_answer(r) == pred for r in references]
  if len(references) < 4:
    return 1.0 if any(is_match) else 0.0
  total = sum(is_match)
  return sum(min(1.0, (total - m) / 3.0) for m in is_match) / len(is_match)


def mean_vqa_accuracy(predictions: Sequence[str],
                      references: Sequence[Sequence[str]]) -> float:
  """Mean of `vqa_accuracy` over questions."""
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} reference lists')
  if not predictions:
    raise ValueError('cannot score zero questions')
  return sum(vqa_accuracy(p, r) for p, r in zip(predictions, references)) / len(predictions)
