"""Tiny random models of the real architectures, built offline for tests.

- passage: MPNet + CLS pooling saved as a sentence-transformers model (multi-qa-mpnet's layout)
- paper:   BERT base + two bottleneck adapters (proximity, adhoc_query) saved with `adapters`
- reranker: BERT with a one-logit classification head (a cross-encoder)
The vocabulary is a WordPiece trained with `tokenizers` on a small text sample.
"""

from __future__ import annotations

from pathlib import Path

import torch

from indexer.config import Settings

WORDS = (
    "graph neural network protein folding language model transformer attention retrieval dense sparse "
    "citation paper abstract method result dataset benchmark accuracy training inference gradient "
    "quantum physics chemistry molecule enzyme climate ocean temperature galaxy star telescope "
    "genome sequence cell tumor cancer therapy vaccine virus bacteria soil plant crop yield "
    "the a of and in to for with on by we our this that is are was were be from as at an"
).split()


def _sample_text(n: int = 4000) -> list[str]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(WORDS), (n,), generator=g).tolist()
    words = [WORDS[i] for i in idx]
    return [" ".join(words[i : i + 40]) for i in range(0, n, 40)] + [" ".join(WORDS)]


def _wordpiece(special: list[str], unk: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_sample_text(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    return tok


def build_mpnet(path: Path, layers: int = 2, hidden: int = 32, pooling: str = "cls") -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as stm
    from tokenizers import processors
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    tok = _wordpiece(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>")
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
    torch.manual_seed(1)
    cfg = MPNetConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=514,
        pad_token_id=tokenizer.pad_token_id,
        # The default 0.02 leaves a 2-layer random model's CLS vector all but independent of the text
        # (cosine 0.999996 between any two), so rankings would be float noise; 0.5 spreads them (~0.46).
        initializer_range=0.5,
    )
    raw = path / "hf"
    MPNetModel(cfg, add_pooling_layer=False).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = stm.Transformer(str(raw), max_seq_length=512)
    st = SentenceTransformer(modules=[transformer, stm.Pooling(hidden, pooling_mode=pooling)], device="cpu")
    st.save(str(path / "st"))
    return path / "st"


def _bert_tokenizer():
    from tokenizers import processors
    from transformers import BertTokenizerFast

    tok = _wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[UNK]")
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


def _bert_config(vocab: int, **kw):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        **kw,
    )


def build_specter2(path: Path) -> tuple[Path, Path, Path]:
    """Returns (base dir, proximity adapter dir, adhoc_query adapter dir)."""
    import adapters
    from transformers import BertModel

    tokenizer = _bert_tokenizer()
    torch.manual_seed(2)
    base = path / "base"
    BertModel(_bert_config(len(tokenizer)), add_pooling_layer=False).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = adapters.AutoAdapterModel.from_pretrained(base)
    dirs = []
    for seed, name in ((3, "proximity"), (4, "adhoc_query")):
        model.add_adapter(name, config="seq_bn")
        # Bottleneck adapters start as (almost) the identity; random weights make their effect visible.
        torch.manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"adapters.{name}." in pname:
                    p.normal_(0, 0.5)
        out = path / name
        model.save_adapter(str(out), name)
        dirs.append(out)
    return base, dirs[0], dirs[1]


def build_cross_encoder(path: Path) -> Path:
    from transformers import BertForSequenceClassification

    tokenizer = _bert_tokenizer()
    torch.manual_seed(5)
    BertForSequenceClassification(_bert_config(len(tokenizer), num_labels=1)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_all(root: Path) -> dict[str, str]:
    """Settings overrides (PAPERINDEX_* field names) pointing at freshly built tiny models."""
    base, prox, adhoc = build_specter2(root / "specter2")
    return {
        "passage_model": str(build_mpnet(root / "mpnet")),
        "paper_model": str(base),
        "paper_adapter": str(prox),
        "query_adapter": str(adhoc),
        "reranker_model": str(build_cross_encoder(root / "reranker")),
        "device": "cpu",
    }


def tiny_settings(tiny_models: dict[str, str], **changes) -> Settings:
    """Settings on the tiny models; small windows and chunks, so that short test texts already span several."""
    small = dict(
        window_tokens=48, window_overlap=8, chunk_words=120, chunk_overlap=20, papers_per_batch=8, token_budget=4096
    )
    return Settings(**{**tiny_models, **small, **changes})
