"""Retrieval quality, measured: `eval` (nDCG@10, Recall@10/100, MRR@10 and latency on a BEIR-format
dataset, every search mode) and `coverage` (known-item search by sentences from anywhere inside a
chunk, by position). The commands `paperindex eval` and `paperindex coverage` run them."""
