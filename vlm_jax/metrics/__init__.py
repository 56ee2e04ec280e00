"""Evaluation metrics in pure numpy / Python (nothing here imports jax).

Modules:
  accuracy   top-k correctness for classification logits.
  caption    corpus BLEU-1..4 and CIDEr-D, equal to the COCO caption
             reference implementation on identical tokenised input; a simple
             caption tokeniser.
  vqa        VQA answer normalisation and VQA accuracy.
  retrieval  image->text and text->image recall@k from a similarity matrix.
  detection  COCO mAP and mAP@0.5 by pycocotools; grounding accuracy at IoU 0.5.
"""
