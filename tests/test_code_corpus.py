"""The code corpus (sara_bench.code_corpus) built from small stand-in archives: no download in the tests.

What the real build does with the pinned wheels is the same code on bigger archives; its figures are in the
README ("Data").
"""
import dataclasses
import io
import json
import os
import random
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from sara_bench import bench, code_corpus, corpus

LICENCE = "# Copyright (c) 2026 Example\n# Licensed under the Apache License, Version 2.0\n"
STAND_INS = (("alpha", "1.0", "train"), ("beta", "2.0", "train"), ("gamma", "0.1", "select"), ("delta", "3.3", "val"))


def _source(rng, package, i):
    names = ["x", "y", "grad", "basis", "rank", "step", "state", "value", "tensor", "items"]
    lines = [LICENCE, f'"""Module {i} of {package}."""', "import math", ""]
    for f in range(rng.randint(2, 5)):
        a, b = rng.sample(names, 2)
        lines += [f"def {package}_{i}_{f}({a}, {b}=None):", f"    if {b} is None:", f"        {b} = {rng.randint(0, 99)}",
                  f"    return math.sqrt({a} * {a} + {b})", ""]
    return "\n".join(lines)


def _archives(folder, files_per_package=12):
    """A wheel (zip) for each stand-in package and a tar.gz sdist for one, with a non-UTF-8 and an empty file."""
    rng = random.Random(0)
    paths = {}
    for name, version, _ in STAND_INS:
        files = {f"{name}/mod_{i:02d}.py": _source(rng, name, i).encode() for i in range(files_per_package)}
        files[f"{name}/latin1.py"] = "# caf\xe9\n".encode("latin-1")
        files[f"{name}/__init__.py"] = b"\n"
        files[f"{name}/data.json"] = b"{}"
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        if name == "beta":
            path = os.path.join(folder, name, f"{name}-{version}.tar.gz")
            with tarfile.open(path, "w:gz") as t:
                for member in reversed(sorted(files)):  # written out of order: the reader sorts
                    info = tarfile.TarInfo(f"{name}-{version}/{member}")
                    info.size = len(files[member])
                    t.addfile(info, io.BytesIO(files[member]))
        else:
            path = os.path.join(folder, name, f"{name}-{version}-py3-none-any.whl")
            with zipfile.ZipFile(path, "w") as z:
                for member in reversed(sorted(files)):
                    z.writestr(member, files[member])
        paths[name] = path
    return paths


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    paths = _archives(str(tmp_path / "archives"))
    monkeypatch.setattr(code_corpus, "PACKAGES", STAND_INS)
    monkeypatch.setattr(code_corpus, "fetch", lambda dest: paths)
    return paths


def test_python_files_are_read_in_path_order_and_exactly_as_written(stand_ins):
    for name in ("alpha", "beta"):  # a wheel and an sdist
        files, skipped = code_corpus.python_files(stand_ins[name])
        paths = [p for p, _ in files]
        assert paths == sorted(paths) and len(paths) == 12  # not the empty __init__, not data.json
        assert skipped == 1  # latin1.py
        assert all(text.startswith(LICENCE) for _, text in files)


def test_the_build_splits_by_package_and_round_trips_every_file(stand_ins, tmp_path):
    out = str(tmp_path / "built")
    manifest = code_corpus.build(out, vocab_size=400)
    assert [p["split"] for p in manifest["packages"]] == ["train", "train", "select", "val"]
    assert {p["name"]: p["files"] for p in manifest["packages"]} == dict.fromkeys(("alpha", "beta", "gamma", "delta"), 12)
    assert all(len(p["sha256"]) == 64 for p in manifest["packages"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert tok.get_vocab_size() <= 400
    eot = tok.token_to_id(code_corpus.EOT)
    for split, package in (("val", "delta"), ("select", "gamma")):
        ids = np.load(os.path.join(out, f"{split}.npy"))
        assert ids.dtype == np.uint16 and manifest["splits"][split]["tokens"] == len(ids)
        docs = np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]  # one document per file, each closed by EOT
        expected = [text for _, text in code_corpus.python_files(stand_ins[package])[0]]
        assert [tok.decode([int(i) for i in d[:-1]]) for d in docs] == expected
    train_docs = int((np.load(os.path.join(out, "train.npy")) == eot).sum())
    assert train_docs == 24  # alpha and beta only: the held-out packages are not trained on


def test_the_build_is_deterministic(stand_ins, tmp_path):
    a = code_corpus.build(str(tmp_path / "a"), vocab_size=400)
    b = code_corpus.build(str(tmp_path / "b"), vocab_size=400)
    assert a["fingerprint"] == b["fingerprint"]
    for name in ("tokenizer.json", "train.npy", "select.npy", "val.npy"):
        with open(tmp_path / "a" / name, "rb") as x, open(tmp_path / "b" / name, "rb") as y:
            assert x.read() == y.read(), name


def test_a_packed_corpus_unpacks_to_the_same_files(stand_ins, tmp_path):
    built = str(tmp_path / "built")
    manifest = code_corpus.build(built, vocab_size=400)
    archive = code_corpus.pack(str(tmp_path / "corpus.tar.xz"), built)
    assert code_corpus.unpack(archive, str(tmp_path / "there")) == manifest
    for name in code_corpus.FILES:
        with open(tmp_path / "built" / name, "rb") as x, open(tmp_path / "there" / name, "rb") as y:
            assert x.read() == y.read(), name
    with tarfile.open(tmp_path / "other.tar.xz", "w:xz") as t:
        t.add(os.path.join(built, "val.npy"), arcname="val.npy")
    with pytest.raises(ValueError, match="not a packed code corpus"):
        code_corpus.unpack(str(tmp_path / "other.tar.xz"), str(tmp_path / "elsewhere"))


def test_a_missing_corpus_and_a_vocab_past_uint16_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SARA_DS_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"python -m sara_bench.code_corpus build"):
        corpus.token_ids("train", "code")
    with pytest.raises(ValueError, match="vocab_size=70000"):
        code_corpus.build(str(tmp_path / "x"), vocab_size=70000)
    with pytest.raises(ValueError, match="data='web'"):
        corpus.token_ids("train", "web")
    with pytest.raises(ValueError, match="data='web'"):
        bench.run_benchmark("smoke", str(tmp_path / "y"), data="web")


def test_the_benchmark_trains_on_the_code_corpus(stand_ins, tmp_path, monkeypatch):
    monkeypatch.setenv("SARA_DS_CACHE", str(tmp_path / "cache"))
    code_corpus.build(code_corpus.cache_dir(), vocab_size=400)  # where --data code reads it (a small vocabulary)
    out = str(tmp_path / "run")
    results = bench.run_benchmark("smoke", out, methods=["SARA-GaLore"], data="code", log=lambda m: None)
    (record,) = results.values()
    assert record["val"] and all(math_finite(v) for _, v in record["val"])
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    assert meta["config"]["data"] == "code"
    prose = bench.size_fingerprint(bench.SIZES["smoke"], "cpu")
    assert meta["fingerprint"] != prose  # a code folder is not resumed as a prose one, nor the reverse
    # the GPU size trains on code by default, at the vocabulary the corpus was built with
    size = bench.SIZES["gpu60m"]
    assert size.data == "code"
    model, *_ = bench.build(bench.RunSpec("AdamW", size.adamw_lrs[0], 0), dataclasses.replace(size, layers=1), "cpu")
    assert model.embed_tokens.weight.shape[0] == 400


def math_finite(v):
    return torch.isfinite(torch.tensor(v)).item()
