"""The bundled real-text corpus (Wikipedia articles + Jane Austen) and its offline BPE tokenizer.

Token ids are cached as .npy under $SARA_DS_CACHE (default ~/.cache/sara_ds), keyed
by a hash of the text and tokenizer, so only the first use pays ~10 s of encoding.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from importlib import resources

import numpy as np
import torch

VOCAB_SIZE = 4096


def _data_path(name: str) -> str:
    return str(resources.files("sara_bench").joinpath("data", name))


def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(_data_path("tokenizer.json"))


# the bundled corpus; the code corpus with the GPU size's 32000-token vocabulary, and with the prose's 4096
# (sara_bench.code_corpus.VARIANTS)
DATA = ("prose", "code", "code4k")


def _check_data(data: str) -> None:
    if data not in DATA:
        raise ValueError(f"sara_bench: data must be one of {DATA}, got data={data!r}")


def vocab_size(data: str = "prose") -> int:
    _check_data(data)
    if data != "prose":
        from . import code_corpus

        return code_corpus.load_manifest(vocab_size=code_corpus.VARIANTS[data])["vocab_size"]
    return VOCAB_SIZE


def token_ids(split: str, data: str = "prose") -> np.ndarray:
    """All tokens of ``split`` ('train' or 'val'; the code corpus also has 'select') as a uint16 array."""
    _check_data(data)
    if data != "prose":
        from . import code_corpus

        return code_corpus.token_ids(split, vocab_size=code_corpus.VARIANTS[data])
    if split not in ("train", "val"):
        raise ValueError(f"sara_bench: split must be 'train' or 'val', got split={split!r}")
    raw = open(_data_path(f"{split}.txt.gz"), "rb").read()
    tok_bytes = open(_data_path("tokenizer.json"), "rb").read()
    key = hashlib.sha256(raw + tok_bytes).hexdigest()[:16]
    cache_dir = os.environ.get("SARA_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sara_ds"))
    path = os.path.join(cache_dir, f"{split}-{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    text = gzip.decompress(raw).decode()
    tok = tokenizer()
    eot = tok.token_to_id("<|endoftext|>")
    ids = []
    for doc in text.split("\n\n"):
        for enc in tok.encode_batch(doc.splitlines(keepends=True)):
            ids.extend(enc.ids)
        ids.append(eot)
    arr = np.asarray(ids, dtype=np.uint16)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    return arr


class Batches:
    """Random windows of ``seq_len + 1`` tokens; a pure function of (seed, step, rank).

    Every data-parallel layout sees the same global batch at a step: rank r of w
    gets rows [r*B/w, (r+1)*B/w) of the global batch, which is what makes
    1-process == DDP == ZeRO comparisons exact.
    """

    def __init__(self, ids: np.ndarray, seq_len: int, global_batch: int, seed: int = 0):
        self.ids = torch.from_numpy(np.asarray(ids).astype(np.int64))
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed

    def get(self, step: int, rank: int = 0, world: int = 1):
        if self.global_batch % world:
            raise ValueError(f"sara_bench: global batch {self.global_batch} is not divisible by world size {world}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.ids) - self.seq_len - 1, (self.global_batch,), generator=gen)
        per = self.global_batch // world
        starts = starts[rank * per:(rank + 1) * per]
        window = torch.stack([self.ids[s:s + self.seq_len + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]


def held_out_windows(seq_len: int, data: str = "prose", split: str = "val", max_tokens: int | None = None):
    """Every non-overlapping window of ``seq_len + 1`` tokens of a held-out split, as one [n, seq_len + 1] tensor:
    what the end-of-run evaluation reads (``max_tokens`` caps the predicted tokens, n * seq_len).

    The code corpus has its own ``val`` (networkx) and ``select`` (mpmath) splits. The prose has one validation
    text: ``val`` is its first half and ``select`` its second, so no token is predicted in both."""
    _check_data(data)
    if split not in ("val", "select"):
        raise ValueError(f"sara_bench: a held-out split is 'val' or 'select', got split={split!r}")
    if data == "prose":
        ids = np.asarray(token_ids("val", data))
        half = (len(ids) - 1) // 2
        ids = ids[:half + 1] if split == "val" else ids[half:]
    else:
        ids = np.asarray(token_ids(split, data))
    n = (len(ids) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise ValueError(f"sara_bench: the {data} {split} split ({len(ids)} tokens) holds no window of {seq_len + 1}")
    ids = torch.from_numpy(ids[:n * seq_len + 1].astype(np.int64))
    return ids.unfold(0, seq_len + 1, seq_len)


def validation_batches(seq_len: int, batch: int, count: int, data: str = "prose", split: str = "val"):
    """Fixed, non-overlapping held-out windows (the same for every run).

    ``split='val'`` is the reported validation set. ``split='select'`` is held out too and is where learning rates
    are chosen: the code corpus's own split, or for the prose the same number of windows from the end of its
    validation text, which must not overlap the reported ones."""
    if data == "prose" and split == "select":
        ids = torch.from_numpy(np.asarray(token_ids("val", data)).astype(np.int64))
        n = min(count * batch, (len(ids) - 1) // seq_len)
        if 2 * n * seq_len + 1 > len(ids):
            raise ValueError(f"sara_bench: the prose validation text ({len(ids)} tokens) is too short for disjoint "
                             f"val and select sets of {count} x {batch} x {seq_len} tokens")
        offset = len(ids) - 1 - n * seq_len
    else:
        ids = torch.from_numpy(np.asarray(token_ids(split, data)).astype(np.int64))
        n = min(count * batch, (len(ids) - 1) // seq_len)
        offset = 0
    windows = [ids[offset + i * seq_len:offset + i * seq_len + seq_len + 1] for i in range(n)]
    for i in range(0, n - batch + 1, batch):
        w = torch.stack(windows[i:i + batch])
        yield w[:, :-1], w[:, 1:]
