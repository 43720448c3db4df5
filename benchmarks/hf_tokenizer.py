"""A Hugging Face `tokenizer.json` for a sentencepiece BPE model (Mistral's `tokenizer.model.v*`),
so that `transformers`, whose AutoTokenizer (5.x) reads neither those files nor, without
protobuf, a bare sentencepiece model, loads a checkpoint of make_checkpoint.py as it loads the hub's.

A sentencepiece BPE model stores its pieces with scores but no merge list: a merge is a way to
split a piece into two pieces of the vocabulary, and sentencepiece, which merges the pair whose
result scores highest, is matched by ranking merges by their result's score, then by their
right part's (which reproduces its choices in runs of spaces too). Control pieces (`<s>`,
`[INST]`, ...) become special tokens; the 256 `<0x..>` pieces are the byte fallback.
"""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

SPACE = "\u2581"  # sentencepiece's visible space


def build(model_file: Path) -> Tokenizer:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {i for i in range(len(pieces)) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    ranked = []  # (rank of the merged piece, right id, left id, left, right)
    for i in mergeable:
        piece = pieces[i]
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left in mergeable and right in mergeable:
                ranked.append((-sp.get_score(i), right, left, piece[:cut], piece[cut:]))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = pieces[sp.unk_id()]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1, right=0)])
    tokenizer.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                                  for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)])
    bos = pieces[sp.bos_id()]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    return tokenizer


def write(model_file: Path, directory: Path) -> None:
    """tokenizer.json, and a tokenizer_config.json that names the generic fast class
    (`PreTrainedTokenizerFast`, which transformers 5 maps to its tokenizers backend)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    build(model_file).save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": sp.id_to_piece(sp.bos_id()),
              "eos_token": sp.id_to_piece(sp.eos_id()), "unk_token": sp.id_to_piece(sp.unk_id()),
              "model_max_length": 32768, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
