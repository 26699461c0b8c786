"""Random-weight models of the real shapes, built offline: throughput does not depend on weight values.

- passage: MPNet-base (multi-qa-mpnet-base-dot-v1's shape: 12×768, 30527 tokens, CLS pooling, no
  normalisation), saved as a sentence-transformers model;
- paper: BERT-base with a SciBERT-sized vocabulary (SPECTER2 base's shape) plus two bottleneck
  adapters (proximity, adhoc_query) saved with `adapters`;
- reranker: a cross-encoder of ms-marco-MiniLM-L6-v2's shape (BERT 6×384, one logit), on the paper vocabulary.
Vocabularies are WordPiece models trained on the benchmark's own prose.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def _wordpiece(texts: Iterable[str], vocab: int, special: list[str], unk: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=special))
    return tok


def passage_wordpiece(texts: Iterable[str]):
    """The passage model's vocabulary (MPNet's size and special tokens), trained on `texts`."""
    return _wordpiece(texts, 30527, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>")


def paper_wordpiece(texts: Iterable[str]):
    """The paper model's vocabulary (SciBERT's size, BERT's special tokens), trained on `texts`."""
    return _wordpiece(texts, 31090, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[UNK]")


def _small(cfg_cls, tiny: bool, **kw):
    """The real shape, or (tiny) 2 layers of 64 for smoke runs on a CPU."""
    if tiny:
        kw.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return cfg_cls(**kw)


def build_passage(path: Path, texts: list[str], tiny: bool = False) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as stm
    from tokenizers import processors
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    tok = passage_wordpiece(texts)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    tokenizer = MPNetTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )
    torch.manual_seed(0)
    cfg = _small(MPNetConfig, tiny, vocab_size=30527, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id)
    raw = path / "hf"
    MPNetModel(cfg, add_pooling_layer=False).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    st = SentenceTransformer(
        modules=[stm.Transformer(str(raw), max_seq_length=512), stm.Pooling(cfg.hidden_size, pooling_mode="cls")],
        device="cpu",
    )
    st.save(str(path / "st"))
    return path / "st"


def paper_tokenizer(texts: list[str]):
    """A BERT tokenizer ([CLS] A [SEP] B [SEP]) on the paper vocabulary trained on `texts`."""
    from tokenizers import processors
    from transformers import BertTokenizerFast

    tok = paper_wordpiece(texts)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def build_paper(path: Path, texts: list[str], tiny: bool = False) -> tuple[Path, Path, Path]:
    """(base dir, proximity adapter dir, adhoc_query adapter dir)."""
    import adapters
    from transformers import BertConfig, BertModel

    tokenizer = paper_tokenizer(texts)
    torch.manual_seed(1)
    base = path / "base"
    BertModel(_small(BertConfig, tiny, vocab_size=31090), add_pooling_layer=False).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = adapters.AutoAdapterModel.from_pretrained(base)
    dirs = []
    for name in ("proximity", "adhoc_query"):
        model.add_adapter(name, config="seq_bn")
        model.save_adapter(str(path / name), name)
        dirs.append(path / name)
    return base, dirs[0], dirs[1]


def build_reranker(path: Path, texts: list[str], tiny: bool = False) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = paper_tokenizer(texts)
    torch.manual_seed(2)
    size = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    cfg = _small(BertConfig, tiny, vocab_size=len(tokenizer), num_labels=1, **size)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
