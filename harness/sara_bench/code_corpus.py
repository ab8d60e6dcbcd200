"""A code corpus big enough for the GPU size: the Python sources of pinned package releases, one document per file.

    python -m sara_bench.code_corpus build          # minutes; needs only the package registries
    python -m sara_bench.code_corpus info           # what the built corpus holds
    python -m sara_bench.code_corpus pack --file c.tar.xz   # for a machine without the registries (xz: val.npy 4.4x)
    python -m sara_bench.code_corpus unpack --file c.tar.xz

The sources are the wheels (deepspeed: its sdist) of ``PACKAGES`` at their pinned versions, fetched with
``pip download --no-deps`` (the set-up installs these packages; the corpus reads the released archives instead of
the virtualenv, so it does not change when the virtualenv does). Every ``*.py`` file of an archive is one
document, read in sorted path order, exactly as written (licence headers included); files that are not UTF-8
are skipped and counted. Held-out splits are whole packages, so that no file of theirs, nor a copy of one, is
trained on: ``select`` (mpmath; for choosing learning rates) and ``val`` (networkx; the reported perplexity).
A ByteLevel BPE of ``VOCAB_SIZE`` tokens is trained on ``train`` only.

The build writes ``$SARA_DS_CACHE/code_corpus/`` (default ``~/.cache/sara_ds/code_corpus``): ``tokenizer.json``,
``train.npy``, ``select.npy`` and ``val.npy`` (uint16 token ids, documents separated by ``<|endoftext|>``) and
``manifest.json`` (each archive's name and sha256, files and bytes per package, tokens per split). The tokens are
a cache, not committed: about 0.1 GB.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np

# (distribution, version, split): what the set-up installs (scripts/setup.sh), at the versions of 2026-11
PACKAGES = (
    ("torch", "2.13.0", "train"),
    ("transformers", "5.24.0", "train"),
    ("sympy", "1.14.0", "train"),
    ("numpy", "2.4.6", "train"),
    ("matplotlib", "3.11.2", "train"),
    ("deepspeed", "0.19.8", "train"),
    ("megatron-core", "0.16.1", "train"),
    ("pygments", "2.21.0", "train"),
    ("huggingface_hub", "2.4.0", "train"),
    ("accelerate", "1.15.0", "train"),
    ("mpmath", "1.3.0", "select"),
    ("networkx", "3.6.1", "val"),
)
SPLITS = ("train", "select", "val")
VOCAB_SIZE = 32000  # LLaMA-60M's (--vocab 4096 builds the code4k corpus)
EOT = "<|endoftext|>"


# The corpus names the benchmark knows (``--data``), by tokenizer size: the GPU size's LLaMA-60M vocabulary, and
# the prose model's for the CPU size (its head then costs what the prose one does: 0.38 s a step against 1.19 s at
# 32000, single-threaded on an AVX-512 Xeon)
VARIANTS = {"code": VOCAB_SIZE, "code4k": 4096}


def cache_dir(vocab_size: int = VOCAB_SIZE) -> str:
    """Where a build of ``vocab_size`` tokens lives: ``code_corpus`` (32000) or ``code_corpus_v<vocab>``."""
    root = os.environ.get("SARA_DS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sara_ds"))
    return os.path.join(root, "code_corpus" if vocab_size == VOCAB_SIZE else f"code_corpus_v{vocab_size}")


def _log(msg: str) -> None:
    print(f"[code corpus] {msg}", file=sys.stderr, flush=True)


def fetch(dest: str) -> dict:
    """Download each pinned archive into ``dest/<name>/`` (pip skips one already there); distribution -> path."""
    found = {}
    for name, version, _ in PACKAGES:
        folder = os.path.join(dest, name)
        run = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", folder,
                              f"{name}=={version}"], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"sara-bench: pip download {name}=={version} failed:\n{run.stdout}{run.stderr}")
        archives = sorted(f for f in os.listdir(folder) if version in f)
        if len(archives) != 1:
            raise FileNotFoundError(f"sara-bench: expected one archive of {name}=={version} in {folder}, "
                                    f"found {sorted(os.listdir(folder))}")
        found[name] = os.path.join(folder, archives[0])
        _log(f"{archives[0]}")
    return found


def python_files(archive: str):
    """(path, text) of every UTF-8 ``*.py`` file in a wheel or sdist, in sorted path order; and the skipped count."""
    files, skipped = [], 0
    if archive.endswith(".whl") or archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            members = sorted(n for n in z.namelist() if n.endswith(".py"))
            raw = [(n, z.read(n)) for n in members]
    else:
        with tarfile.open(archive) as t:
            members = sorted((m for m in t.getmembers() if m.isfile() and m.name.endswith(".py")), key=lambda m: m.name)
            raw = [(m.name, t.extractfile(m).read()) for m in members]
    for name, data in raw:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if text.strip():
            files.append((name, text))
    return files, skipped


def train_tokenizer(documents, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tok


def encode(tok, documents, label: str) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    parts, chunk = [], 512
    for i in range(0, len(documents), chunk):
        for enc in tok.encode_batch(documents[i:i + chunk]):
            parts.append(np.asarray(enc.ids + [eot], dtype=np.uint16))
        if (i // chunk) % 4 == 3 or i + chunk >= len(documents):
            _log(f"encoding {label}: {min(i + chunk, len(documents))}/{len(documents)} files")
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def build(out: str | None = None, vocab_size: int = VOCAB_SIZE, archives: str | None = None) -> dict:
    """Fetch, split, train the tokenizer, encode; write ``out`` (default ``cache_dir()``); return the manifest."""
    if vocab_size > 65535:
        raise ValueError(f"sara-bench: vocab_size={vocab_size} does not fit the uint16 token files")
    out = out or cache_dir(vocab_size)
    started = time.time()
    os.makedirs(out, exist_ok=True)
    paths = fetch(archives or os.path.join(out, "archives"))
    docs = {split: [] for split in SPLITS}
    manifest = dict(vocab_size=vocab_size, packages=[], splits={})
    for name, version, split in PACKAGES:
        files, skipped = python_files(paths[name])
        docs[split].extend(text for _, text in files)
        with open(paths[name], "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        manifest["packages"].append(dict(name=name, version=version, split=split, archive=os.path.basename(paths[name]),
                                         sha256=digest, files=len(files), skipped_files=skipped,
                                         bytes=sum(len(t.encode()) for _, t in files)))
        _log(f"{name}=={version}: {len(files)} files, {manifest['packages'][-1]['bytes'] / 1e6:.1f} MB -> {split}")
    _log(f"training a {vocab_size}-token ByteLevel BPE on {len(docs['train'])} train files")
    tok = train_tokenizer(docs["train"], vocab_size)
    tok.save(os.path.join(out, "tokenizer.json"))
    for split in SPLITS:
        ids = encode(tok, docs[split], split)
        np.save(os.path.join(out, f"{split}.npy"), ids)
        text_bytes = sum(len(d.encode()) for d in docs[split])
        manifest["splits"][split] = dict(files=len(docs[split]), bytes=text_bytes, tokens=int(len(ids)),
                                         bytes_per_token=round(text_bytes / max(1, len(ids)), 3))
    manifest["fingerprint"] = hashlib.sha256(
        json.dumps([manifest["packages"], vocab_size], sort_keys=True).encode()).hexdigest()[:12]
    manifest["build_seconds"] = round(time.time() - started, 1)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    _log(f"done in {manifest['build_seconds']} s: " + ", ".join(
        f"{s} {manifest['splits'][s]['tokens'] / 1e6:.1f}M tokens" for s in SPLITS) + f"; written to {out}")
    return manifest


def load_manifest(folder: str | None = None, vocab_size: int = VOCAB_SIZE) -> dict:
    folder = folder or cache_dir(vocab_size)
    path = os.path.join(folder, "manifest.json")
    if not os.path.exists(path):
        flag = "" if vocab_size == VOCAB_SIZE else f" --vocab {vocab_size}"
        raise FileNotFoundError(f"sara-bench: the code corpus is not built ({path} is missing); build it with "
                                f"`python -m sara_bench.code_corpus build{flag}` (minutes, package registries only), "
                                "or set SARA_DS_CACHE to where it was built")
    with open(path) as f:
        return json.load(f)


def token_ids(split: str, folder: str | None = None, vocab_size: int = VOCAB_SIZE) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"sara-bench: the code corpus has splits {SPLITS}, got split={split!r}")
    load_manifest(folder, vocab_size)
    return np.load(os.path.join(folder or cache_dir(vocab_size), f"{split}.npy"), mmap_mode="r")


FILES = ("manifest.json", "tokenizer.json", "train.npy", "select.npy", "val.npy")


def pack(archive: str, folder: str | None = None) -> str:
    """The built corpus as one xz tarball (the token files compress ~4x), for a machine that cannot download."""
    folder = folder or cache_dir()
    load_manifest(folder)
    with tarfile.open(archive, "w:xz") as t:
        for name in FILES:
            t.add(os.path.join(folder, name), arcname=name)
    return archive


def unpack(archive: str, folder: str | None = None) -> dict:
    """Extract a ``pack``ed corpus into ``folder`` (default ``cache_dir()``); its manifest."""
    folder = folder or cache_dir()
    os.makedirs(folder, exist_ok=True)
    with tarfile.open(archive, "r:xz") as t:
        names = sorted(t.getnames())
        if names != sorted(FILES):
            raise ValueError(f"sara-bench: {archive} is not a packed code corpus: it holds {names}, not {list(FILES)}")
        t.extractall(folder, filter="data")
    return load_manifest(folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("build", "info", "pack", "unpack"))
    ap.add_argument("--out", default=None, help="the corpus folder (default: $SARA_DS_CACHE/code_corpus, or "
                    "code_corpus_v<vocab> for another --vocab)")
    ap.add_argument("--file", default="code_corpus.tar.xz", help="pack / unpack: the tarball")
    ap.add_argument("--vocab", type=int, default=VOCAB_SIZE,
                    help=f"tokenizer size (default {VOCAB_SIZE}; the benchmark's --data names: {VARIANTS})")
    ap.add_argument("--archives", default=None, help="folder for the downloaded archives (default: OUT/archives)")
    args = ap.parse_args(argv)
    if args.command == "pack":
        print(pack(args.file, args.out or cache_dir(args.vocab)))
        return 0
    folder = args.out or cache_dir(args.vocab)
    manifest = (build(folder, args.vocab, args.archives) if args.command == "build"
                else unpack(args.file, folder) if args.command == "unpack" else load_manifest(folder))
    print(json.dumps(dict(splits=manifest["splits"], vocab_size=manifest["vocab_size"],
                          fingerprint=manifest["fingerprint"]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
