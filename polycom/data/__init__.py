"""Data: corpora -> tokenizers -> memmap token shards -> rank-aware window loaders.

>>> from polycom.data import prepare_default, TokenShards, WindowLoader
>>> data_dir = prepare_default()                      # stdlib -> cached BPE -> cached shards
>>> loader = WindowLoader(TokenShards(data_dir, "train"), seq_len=128, batch_size=8, seed=0)
>>> inputs, targets = loader.batch(step=0)            # LongTensor[8, 128] each

Submodules: ``corpus`` (embedded stdlib corpus, split rule, fingerprint), ``sources`` (local files,
Hugging Face datasets), ``tokenizer`` (byte-level BPE, loading), ``shards`` (prepare / open),
``loader`` (training and validation windows, unigram baseline), ``prepare`` (one-call pipeline).
"""

from polycom.data.corpus import Corpus, stdlib_corpus
from polycom.data.loader import ValidationWindows, WindowLoader, unigram_entropy
from polycom.data.prepare import DEFAULT_VOCAB_SIZE, load_corpus, prepare_data, prepare_default
from polycom.data.shards import TokenShards, prepare_shards, read_index, select_dtype
from polycom.data.sources import hf_corpus, local_corpus
from polycom.data.tokenizer import Tokenizer, default_cache_dir, load_tokenizer, train_bpe

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "Corpus",
    "TokenShards",
    "Tokenizer",
    "ValidationWindows",
    "WindowLoader",
    "default_cache_dir",
    "hf_corpus",
    "load_corpus",
    "load_tokenizer",
    "local_corpus",
    "prepare_data",
    "prepare_default",
    "prepare_shards",
    "read_index",
    "select_dtype",
    "stdlib_corpus",
    "train_bpe",
    "unigram_entropy",
]
