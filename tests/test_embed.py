"""`bertscale embed` on the real MiniLM weights: every layer choice and pooling equals the hidden
states of `transformers.BertModel(output_hidden_states=True)` run on each sentence alone (so
padding in our batches is covered too), the output files join back to the input lines in every
format, and two ranks write the same features in the same order as one.

Tolerance: 1e-5 absolute per layer on features of magnitude up to ~5 (fp32 on the CPU; the
measured difference of one layer from transformers is ~1e-6, up to 1e-5, from summation order
inside the kernels); a sum of layers gets 1e-5 x the sum of the |weights| (4e-5 for the last four),
since the layers' differences add.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bertscale import embed, features
from bertscale.commands import embed as embed_command
from bertscale.errors import UserError
from bertscale.finetune.models import Pretrained, load_checkpoint

from launch import run_ranks

ATOL = 1e-5


@pytest.fixture(scope="module")
def sentences(shared_data: Path) -> list[str]:
    """Real text of mixed lengths: the first 24 CoLA dev sentences."""
    lines = (shared_data / "glue" / "CoLA" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[3] for line in lines[:24]]


@pytest.fixture(scope="module")
def pretrained(minilm_dir: Path) -> Pretrained:
    return load_checkpoint(minilm_dir)


@pytest.fixture(scope="module")
def hf_hidden(minilm_dir: Path, sentences: list[str]) -> list[tuple[list[torch.Tensor], list[int]]]:
    """transformers' hidden states (L + 1 of (T, H)) for each sentence alone, and the position
    of each whitespace word's first word piece (from transformers' own tokenizer)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    out = []
    for s in sentences:
        enc = tok(s.split(), is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        word_ids = enc.word_ids()
        first = [word_ids.index(w) for w in range(len(s.split()))]
        out.append(([h[0] for h in hs], first))
    return out


def _reference(hs: list[torch.Tensor], layers: str, weights: list[float] | None) -> torch.Tensor:
    """The paper's combinations written out independently of features.combine_layers."""
    if layers == "embeddings":
        return hs[0]
    if layers == "last":
        return hs[-1]
    if layers == "second-to-last":
        return hs[-2]
    if layers == "sum-last-four":
        return hs[-1] + hs[-2] + hs[-3] + hs[-4]
    if layers == "concat-last-four":
        return torch.cat([hs[-1], hs[-2], hs[-3], hs[-4]], dim=-1)
    if layers == "weighted-sum":
        w = weights or [1 / (len(hs) - 1)] * (len(hs) - 1)
        return sum(wi * h for wi, h in zip(w, hs[1:]))
    return hs[int(layers)]


LAYER_CASES = [("embeddings", None), ("last", None), ("second-to-last", None),
               ("sum-last-four", None), ("concat-last-four", None), ("weighted-sum", None),
               ("weighted-sum", [0.5, -1.0, 0.25, 2.0, 0.0, 1.5]), ("-3", None)]


@pytest.mark.parametrize("layers,weights", LAYER_CASES, ids=[f"{name}{'-given' if w else ''}"
                                                             for name, w in LAYER_CASES])
def test_features_equal_transformers_hidden_states(pretrained, sentences, hf_hidden, layers,
                                                   weights) -> None:
    ex = features.FeatureExtractor(pretrained, layers, weights)
    sel = ex.selection
    tol = ATOL * (sum(abs(w) for w in sel.weights) if sel.weights else
                  len(sel.indices) if sel.mode == "sum" else 1)
    H = pretrained.config.hidden_size
    assert ex.dim == (4 * H if layers == "concat-last-four" else H)
    refs = [_reference(hs, layers, weights) for hs, _ in hf_hidden]              # (T_i, D)
    # All 24 sentences in one padded batch against each sentence alone in transformers.
    cls, _ = ex.embed_texts(sentences, "cls")
    mean, _ = ex.embed_texts(sentences, "mean")
    words, cut = ex.embed_words([s.split() for s in sentences])
    assert cut == 0
    for i, ((_, first), ref) in enumerate(zip(hf_hidden, refs)):
        np.testing.assert_allclose(cls[i], ref[0].numpy(), atol=tol, rtol=0)
        np.testing.assert_allclose(mean[i], ref.mean(0).numpy(), atol=tol, rtol=0)
        assert words[i].shape == (len(sentences[i].split()), ex.dim)
        np.testing.assert_allclose(words[i], ref[first].numpy(), atol=tol, rtol=0)


def test_padding_never_reaches_a_sentence(pretrained, sentences) -> None:
    """Mean pooling and word vectors of a sentence are the same alone and in a padded batch
    beside a much longer one (the mask is honoured in attention and in the mean)."""
    ex = features.FeatureExtractor(pretrained, "last")
    short = min(sentences, key=len)
    long = " ".join(sentences)                    # ~10x longer: most of short's row is padding
    batch, _ = ex.embed_texts([short, long], "mean")
    alone, _ = ex.embed_texts([short], "mean")
    np.testing.assert_allclose(batch[0], alone[0], atol=ATOL, rtol=0)
    wb, _ = ex.embed_words([short.split(), long.split()])
    wa, _ = ex.embed_words([short.split()])
    np.testing.assert_allclose(wb[0], wa[0], atol=ATOL, rtol=0)
    # The padded mean differs from an unmasked mean over the padded row: the check can fail.
    h, mask = ex._features([ex.text_tok.encode(short).ids, ex.text_tok.encode(long).ids])
    assert not np.allclose(h[0].mean(0).numpy(), alone[0], atol=1e-3)


def test_layer_choices_are_checked() -> None:
    assert features.select_layers("concat-last-four", 12).indices == (12, 11, 10, 9)
    assert features.select_layers("weighted-sum", 4).weights == (0.25,) * 4
    assert features.select_layers("-1", 6).indices == (6,)
    with pytest.raises(UserError, match="needs at least 4 encoder layers; the model has 2"):
        features.select_layers("sum-last-four", 2)
    with pytest.raises(UserError, match="has 3 values; the model has 6 encoder layers"):
        features.select_layers("weighted-sum", 6, [1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="only for --layers weighted-sum"):
        features.select_layers("last", 6, [1.0] * 6)
    with pytest.raises(UserError, match="hidden states 0..6"):
        features.select_layers("7", 6)


def test_words_the_tokenizer_drops_and_long_inputs(pretrained) -> None:
    ex = features.FeatureExtractor(pretrained, "last", max_seq_length=8)
    # A zero-width space alone makes no word piece: it is read as [UNK], so it still has a vector.
    (enc,) = features.encode_words(ex.word_tok, [["Paris", "\u200b", "is", "big"]], 16)
    assert len(enc.first) == 4 and enc.ids[enc.first[1]] == ex.word_tok.token_to_id("[UNK]")
    # 8 word pieces hold [CLS] + 6 + [SEP]: words from the 7th on are cut and counted.
    vecs, cut = ex.embed_words([["a"] * 10, ["b"] * 3])
    assert cut == 1 and [len(v) for v in vecs] == [6, 3]
    pooled, cut = ex.embed_texts(["one two three four five six seven eight", "short"], "cls")
    assert cut == 1 and pooled.shape == (2, ex.dim)


def _embed(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bertscale")
    embed_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["embed", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sentences) -> dict[str, Path]:
    """The same records as text, TSV (the CoLA layout, column 3) and JSON lines, with blank
    lines so that ids (line numbers) differ from record numbers."""
    d = tmp_path_factory.mktemp("inputs")
    lines: list[str | None] = []
    for i, s in enumerate(sentences):
        lines.append(s)
        if i % 7 == 3:
            lines.append(None)
    (d / "in.txt").write_text("".join((s or "") + "\n" for s in lines), encoding="utf-8")
    (d / "in.tsv").write_text("source\tlabel\tmark\tsentence\n" + "".join(
        f"x\t1\t\t{s}\n" if s else "\n" for s in lines), encoding="utf-8")
    (d / "in.jsonl").write_text("".join(
        json.dumps({"id": i, "text": s, "words": s.split()}) + "\n" if s else "  \n"
        for i, s in enumerate(lines)), encoding="utf-8")
    return {"text": d / "in.txt", "tsv": d / "in.tsv", "jsonl": d / "in.jsonl",
            "ids": [n for n, s in enumerate(lines) if s]}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def one_rank_output(tmp_path_factory, minilm_dir, inputs) -> Path:
    out = tmp_path_factory.mktemp("one") / "feats"
    assert _embed(["--checkpoint", str(minilm_dir), "--input", str(inputs["text"]),
                   "--output-dir", str(out), "--layers", "concat-last-four", "--pooling", "mean",
                   "--batch-size", "5", "--shard-size", "7", "--no-progress"]) == 0
    return out


def test_output_joins_back_to_the_input_in_every_format(tmp_path, minilm_dir, pretrained,
                                                        sentences, inputs, one_rank_output) -> None:
    ex = features.FeatureExtractor(pretrained, "concat-last-four")
    expected, _ = ex.embed_texts(sentences, "mean")
    manifest = embed.read_manifest(one_rank_output)
    assert manifest["records"] == 24 and manifest["world_size"] == 1
    assert [s["records"] for s in manifest["shards"]] == [7, 7, 7, 3]
    ids, feats = embed.load_features(one_rank_output)
    assert ids.tolist() == inputs["ids"]
    np.testing.assert_allclose(feats, expected, atol=ATOL, rtol=0)
    assert [p.name for p in one_rank_output.parent.iterdir()] == ["feats"]

    # TSV by header name (the header line is line 0, so ids are the same line numbers + 1).
    tsv = tmp_path / "tsv"
    assert _embed(["--checkpoint", str(minilm_dir), "--input", str(inputs["tsv"]), "--column",
                   "sentence", "--output-dir", str(tsv), "--layers", "concat-last-four",
                   "--pooling", "mean", "--format", "safetensors", "--no-progress"]) == 0
    ids, feats = embed.load_features(tsv)
    assert ids.tolist() == [i + 1 for i in inputs["ids"]]
    np.testing.assert_allclose(feats, expected, atol=ATOL, rtol=0)

    # JSON lines, one vector per word (ragged, WebDataset tar) and float16 storage.
    words_expected, _ = ex.embed_words([s.split() for s in sentences])
    wds = tmp_path / "wds"
    assert _embed(["--checkpoint", str(minilm_dir), "--input", str(inputs["jsonl"]), "--field",
                   "words", "--output-dir", str(wds), "--layers", "concat-last-four",
                   "--pooling", "first-subtoken", "--format", "wds", "--dtype", "float16",
                   "--shard-size", "10", "--no-progress"]) == 0
    ids, vecs = embed.load_features(wds)
    assert ids.tolist() == inputs["ids"]
    for v, e in zip(vecs, words_expected):
        assert v.dtype == np.float16 and v.shape == e.shape
        np.testing.assert_allclose(v.astype(np.float32), e, atol=5e-3 * max(1, np.abs(e).max()))
    import webdataset  # the tar is a plain WebDataset: samples keyed by id, in id order
    keys = [s["__key__"] for s in webdataset.WebDataset(
        str(wds / embed.read_manifest(wds)["shards"][0]["files"]["tar"]), shardshuffle=False)]
    assert keys == [f"{i:012d}" for i in inputs["ids"][:10]]

    # The same words as npy with offsets; --shard-mb 1 closes a shard at 1 MiB of features
    # (~170 words of 1536 fp32), long before --shard-size records.
    npy = tmp_path / "npy"
    assert _embed(["--checkpoint", str(minilm_dir), "--input", str(inputs["jsonl"]), "--field",
                   "words", "--output-dir", str(npy), "--layers", "concat-last-four",
                   "--pooling", "first-subtoken", "--shard-mb", "1", "--no-progress"]) == 0
    shards = embed.read_manifest(npy)["shards"]
    assert len(shards) >= 2 and all(s["rows"] * 1536 * 4 < (1 << 20) + 60 * 1536 * 4
                                    for s in shards)
    offsets = np.load(npy / shards[0]["files"]["offsets"])
    n = shards[0]["records"]
    assert offsets.tolist() == [0, *np.cumsum([len(s.split()) for s in sentences[:n]]).tolist()]
    ids, vecs = embed.load_features(npy)
    assert ids.tolist() == inputs["ids"]
    for v, e in zip(vecs, words_expected):
        np.testing.assert_allclose(v, e, atol=ATOL, rtol=0)

    # gzip-compressed input reads the same records.
    gz = tmp_path / "in.txt.gz"
    gz.write_bytes(gzip.compress(inputs["text"].read_bytes()))
    assert _embed(["--checkpoint", str(minilm_dir), "--input", str(gz), "--output-dir",
                   str(tmp_path / "gz"), "--layers", "concat-last-four", "--pooling", "mean",
                   "--no-progress"]) == 0
    ids, feats = embed.load_features(tmp_path / "gz")
    assert ids.tolist() == inputs["ids"]
    np.testing.assert_allclose(feats, expected, atol=ATOL, rtol=0)


def test_bad_input_names_the_line_and_leaves_nothing(tmp_path, minilm_dir, inputs) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"txt": "oops"}\n', encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"bad\.jsonl:3: no field 'text' \(it has: txt\)"):
        _embed(["--checkpoint", str(minilm_dir), "--input", str(bad), "--field", "text",
                "--output-dir", str(out)])
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    short = tmp_path / "short.tsv"
    short.write_text("a\tb\nc\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"short\.tsv:2: 1 tab-separated columns, --column 1"):
        _embed(["--checkpoint", str(minilm_dir), "--input", str(short), "--column", "1",
                "--output-dir", str(out)])
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(UserError, match="out: (already exists|exists and holds files)"):
            _embed(["--checkpoint", str(minilm_dir), "--input", str(inputs["text"]),
                    "--output-dir", str(out), *extra])
    assert (out / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_two_ranks_write_the_same_features_in_the_same_order(tmp_path, minilm_dir, inputs,
                                                              one_rank_output) -> None:
    out = tmp_path / "two"
    run_ranks(["-m", "bertscale.cli", "embed", "--checkpoint", str(minilm_dir), "--input",
               str(inputs["text"]), "--output-dir", str(out), "--layers", "concat-last-four",
               "--pooling", "mean", "--batch-size", "4", "--shard-size", "5"], 2, timeout=240)
    manifest = embed.read_manifest(out)
    assert manifest["world_size"] == 2 and manifest["records"] == 24
    # Rank r holds records r, r + 2, ...: disjoint, strided, each shard in id order.
    record_no = {line: k for k, line in enumerate(inputs["ids"])}
    for shard in manifest["shards"]:
        ids = np.load(out / shard["files"]["ids"]).tolist()
        assert ids == sorted(ids) and {record_no[i] % 2 for i in ids} == {shard["rank"]}
    assert [(s["rank"], s["records"]) for s in manifest["shards"]] == \
        [(0, 5), (0, 5), (0, 2), (1, 5), (1, 5), (1, 2)]
    ids2, feats2 = embed.load_features(out)
    ids1, feats1 = embed.load_features(one_rank_output)
    assert ids2.tolist() == ids1.tolist()
    np.testing.assert_allclose(feats2, feats1, atol=ATOL, rtol=0)
    assert not list(tmp_path.glob(".*"))  # no partial folder left behind


@pytest.mark.gpu
def test_bf16_autocast_on_a_gpu_stays_close_to_fp32(pretrained, sentences) -> None:
    """`--precision auto` on a GPU is bf16 autocast; its features are the fp32 ones to bf16's
    precision (measured on an H100: see the thresholds), and fp32 on the GPU matches the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cpu = features.FeatureExtractor(pretrained, "concat-last-four", device="cpu")
    gpu32 = features.FeatureExtractor(pretrained, "concat-last-four", device="cuda", precision="fp32")
    bf16 = features.FeatureExtractor(pretrained, "concat-last-four", device="cuda")
    assert bf16.amp_dtype == torch.bfloat16 and gpu32.amp_dtype is None
    ref, _ = cpu.embed_texts(sentences, "mean")
    np.testing.assert_allclose(gpu32.embed_texts(sentences, "mean")[0], ref, atol=1e-4, rtol=0)
    low, _ = bf16.embed_texts(sentences, "mean")
    cos = (low * ref).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(ref, axis=1))
    words_ref, _ = cpu.embed_words([s.split() for s in sentences])
    words_low, _ = bf16.embed_words([s.split() for s in sentences])
    w_ref, w_low = np.concatenate(words_ref), np.concatenate(words_low)
    w_cos = (w_low * w_ref).sum(1) / (np.linalg.norm(w_low, axis=1) * np.linalg.norm(w_ref, axis=1))
    print(f"bf16 vs fp32: sentence cosine min {cos.min():.5f}, word cosine min {w_cos.min():.5f}, "
          f"max abs diff {np.abs(low - ref).max():.4f}")
    assert cos.min() > 0.999 and w_cos.min() > 0.99
