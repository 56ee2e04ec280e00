"""Our `data.tokenizer.Tokenizer` as a `transformers.PreTrainedTokenizerFast`, saved next to an exported model."""

import tokenizers
from tokenizers import processors

from vlm_jax.data.tokenizer import BOS, EOS, MASK, PAD, SEP, UNK, Tokenizer


def hf_fast_tokenizer(tok: Tokenizer):
  """A `transformers.PreTrainedTokenizerFast` equal to `tok`, for `save_pretrained` next to a model.

  bos/eos/pad/unk/mask/sep tokens are set (sep_token is our <sep>). Unlike `Tokenizer.encode`,
  calling it adds the specials the models were trained with, `[BOS] text [EOS]`
  (`add_special_tokens=False` gives exactly `tok.encode(text)`); `decode(...,
  skip_special_tokens=True)` gives the same text as `tok.decode` for ids without EOS inside.
  """
  from transformers import PreTrainedTokenizerFast  # heavy to import; only an export needs it
  backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
  backend.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {SEP} $B {EOS}",
      special_tokens=[(BOS, tok.bos_id), (EOS, tok.eos_id), (SEP, tok.sep_id)])
  return PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
      mask_token=MASK, sep_token=SEP, padding_side="right", clean_up_tokenization_spaces=False)
