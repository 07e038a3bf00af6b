"""Data: dataset-id token at position 0, a disjoint seeded train/valid split, batches as a pure
function of the step, epochs that cover every row once, mixing, padded evaluation batches, and
errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest

from forgetting_lib.engine import data
from forgetting_lib.engine.data import (
    Batcher,
    DataError,
    eval_batches,
    mix_row_count,
    open_rows,
)
from forgetting_lib.prep.binarize import TokenFileError, sidecar_path

from tokenfiles import FIRST_TEXT_ID, write_token_file

T, V = 16, 64


@pytest.fixture(scope="module")
def main_file(tmp_path_factory):
    """100 rows of T=16 i.i.d. tokens (rows identifiable by content), plus 5 spare tokens."""
    path = tmp_path_factory.mktemp("data") / "main.bin"
    return write_token_file(path, 100 * T + 5, vocab_size=V, dataset_token=1, pattern="random", seed=1)


@pytest.fixture(scope="module")
def mix_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mix.bin"
    return write_token_file(path, 50 * T, vocab_size=V, dataset_token=2, pattern="random", seed=2)


def open_main(path, split_seed=0, valid_tokens=20 * T, **kw):
    return open_rows(path, T=T, valid_tokens=valid_tokens, split_seed=split_seed, vocab_size=V, **kw)


def row_ids(rows: data.TokenRows, batch: np.ndarray) -> list[int]:
    """Which row of the file each batch row is (by its content after position 0)."""
    table = {rows.rows(np.array([i]))[0, 1:].tobytes(): i for i in range(len(rows.tokens) // rows.T)}
    return [table[r[1:].tobytes()] for r in batch]


def test_rows_start_with_the_dataset_token_not_the_raw_token(main_file):
    rows = open_main(main_file)
    raw = np.fromfile(main_file, dtype="<u2")
    assert rows.dataset_token == 1 and raw.min() >= FIRST_TEXT_ID  # position 0 is never 1 raw
    batcher = Batcher(rows, batch_size=8, seed=0)
    for batch in [batcher.batch(0), batcher.batch(7), *eval_batches(rows, 8)[0]]:
        assert batch.dtype == np.int32 and batch.shape[1] == T
        assert (batch[:, 0] == 1).all()
    # the rest of each row is the file's tokens, unchanged
    got = rows.rows(np.array([3, 10]))
    np.testing.assert_array_equal(got[:, 1:], raw[[3 * T + np.arange(1, T), 10 * T + np.arange(1, T)]])


def test_split_is_disjoint_complete_and_seeded(main_file):
    rows = open_main(main_file)
    n_rows = (100 * T + 5) // T
    assert len(rows.valid_rows) == 20 and len(rows.train_rows) == n_rows - 20
    assert not set(rows.train_rows) & set(rows.valid_rows)
    assert sorted([*rows.train_rows, *rows.valid_rows]) == list(range(n_rows))
    # by content too: no validation row appears among the training batches of an epoch
    batcher = Batcher(rows, batch_size=8, seed=0)
    seen = set(row_ids(rows, np.concatenate([batcher.batch(s) for s in range(10)])))
    assert seen == set(rows.train_rows.tolist())
    again, other = open_main(main_file, split_seed=0), open_main(main_file, split_seed=1)
    np.testing.assert_array_equal(again.valid_rows, rows.valid_rows)
    assert not np.array_equal(other.valid_rows, rows.valid_rows)
    # valid_tokens rounds up to whole rows
    assert len(open_main(main_file, valid_tokens=T + 1).valid_rows) == 2


def test_batches_are_a_pure_function_of_the_step(main_file):
    rows = open_main(main_file)
    a, b = Batcher(rows, 8, seed=3), Batcher(open_main(main_file), 8, seed=3)
    for step in (0, 5, 17, 4):
        np.testing.assert_array_equal(a.batch(step), b.batch(step))
        np.testing.assert_array_equal(a.batch(step), a.batch(step))
    assert not np.array_equal(a.batch(0), a.batch(1))
    assert not np.array_equal(a.batch(0), Batcher(rows, 8, seed=4).batch(0))  # the seed matters


def test_each_epoch_covers_every_train_row_exactly_once(main_file):
    rows = open_main(main_file)  # 80 train rows
    batcher = Batcher(rows, 8, seed=0)
    epochs = [row_ids(rows, np.concatenate([batcher.batch(e * 10 + s) for s in range(10)])) for e in range(2)]
    for ids in epochs:
        assert sorted(ids) == sorted(rows.train_rows.tolist())
    assert epochs[0] != epochs[1]  # each epoch is a fresh permutation
    assert batcher.epochs(10) == 1.0 and batcher.epochs(15) == 1.5


def test_epochs_cover_every_row_when_the_batch_does_not_divide_them(main_file):
    rows = open_main(main_file, valid_tokens=23 * T)  # 77 train rows, batch 6
    n = len(rows.train_rows)
    positions = data.positions_to_rows(rows.train_rows, 0, 4 * n, seed=5, stream=data.STREAM_TRAIN)
    for e in range(4):
        assert sorted(positions[e * n : (e + 1) * n].tolist()) == sorted(rows.train_rows.tolist())
    batcher = Batcher(rows, 6, seed=5)
    flat = np.concatenate([batcher.batch(s) for s in range(40)])  # 240 rows: into the 4th epoch
    np.testing.assert_array_equal(row_ids(rows, flat), positions[:240])
    # a window that straddles an epoch boundary is the tail of one permutation + head of the next
    window = data.positions_to_rows(rows.train_rows, n - 3, 6, seed=5, stream=data.STREAM_TRAIN)
    np.testing.assert_array_equal(window, positions[n - 3 : n + 3])


def test_mixing_puts_the_mix_rows_at_the_end_of_each_batch(main_file, mix_file):
    main = open_main(main_file)
    mix = open_rows(mix_file, T=T, valid_tokens=10 * T, split_seed=0, vocab_size=V)
    for B, fraction in [(8, 0.25), (10, 0.5), (8, 0.1), (4, 0.9)]:
        m = mix_row_count(B, fraction)
        assert m == min(B - 1, max(1, round(fraction * B)))
        batcher = Batcher(main, B, seed=0, mix=mix, mix_rows=m)
        for step in range(3):
            batch = batcher.batch(step)
            assert batch.shape == (B, T)
            assert (batch[: B - m, 0] == 1).all() and (batch[B - m :, 0] == 2).all()
            assert set(row_ids(mix, batch[B - m :])) <= set(mix.train_rows.tolist())
            assert set(row_ids(main, batch[: B - m])) <= set(main.train_rows.tolist())
    assert mix_row_count(8, 0.0) == 0 and mix_row_count(8, 0.01) == 1
    # an epoch of the main file counts only the main rows of each batch
    assert Batcher(main, 10, seed=0, mix=mix, mix_rows=2).epochs(10) == 1.0


@pytest.mark.parametrize("Be", [1, 6, 7, 20, 64])
def test_eval_batches_cover_every_valid_row_once_with_padding_masked(main_file, Be):
    rows = open_main(main_file)  # 20 valid rows
    tokens, mask = eval_batches(rows, Be)
    nb, be, t = tokens.shape
    assert t == T and mask.shape == (nb, be) and mask.dtype == np.float32
    assert be == min(Be, 20) and nb == -(-20 // be)
    flat, m = tokens.reshape(-1, T), mask.reshape(-1)
    assert set(np.unique(m)) <= {0.0, 1.0} and m.sum() == 20
    assert sorted(row_ids(rows, flat[m == 1])) == sorted(rows.valid_rows.tolist())
    assert (flat[:, 0] == 1).all()
    _, train_mask = eval_batches(rows, Be, which="train")
    assert train_mask.sum() == len(rows.train_rows)


def test_no_valid_rows_to_evaluate_is_an_error(main_file):
    with pytest.raises(DataError, match="main.bin"):
        eval_batches(open_main(main_file, valid_tokens=0), 8)


def test_dataset_too_small_for_one_batch_names_the_file(tmp_path):
    path = write_token_file(tmp_path / "tiny.bin", 10 * T, vocab_size=V)
    with pytest.raises(DataError, match=r"tiny\.bin.*10 rows"):
        open_rows(path, T=T, valid_tokens=4 * T, split_seed=0, vocab_size=V, min_train_rows=8)
    open_rows(path, T=T, valid_tokens=4 * T, split_seed=0, vocab_size=V, min_train_rows=6)  # fits


def test_tokenizer_larger_than_the_model_vocab_is_an_error(tmp_path):
    path = write_token_file(tmp_path / "big_vocab.bin", 10 * T, vocab_size=128, pattern="cycle")
    with pytest.raises(DataError, match=r"big_vocab\.bin.*128.*model\.V=64"):
        open_rows(path, T=T, valid_tokens=0, split_seed=0, vocab_size=V)


def test_token_id_beyond_the_model_vocab_is_an_error(tmp_path):
    ids = np.full(10 * T, 5)
    ids[37] = V  # one id out of range, although the sidecar claims vocab_size = V
    path = write_token_file(tmp_path / "bad_id.bin", 10 * T, vocab_size=V, tokens=ids)
    with pytest.raises(DataError, match=rf"bad_id\.bin.*token id {V} >= model\.V={V}"):
        open_rows(path, T=T, valid_tokens=0, split_seed=0, vocab_size=V)


def test_missing_sidecar_is_an_error(tmp_path):
    path = write_token_file(tmp_path / "orphan.bin", 10 * T, vocab_size=V)
    sidecar_path(path).unlink()
    with pytest.raises(TokenFileError, match=r"orphan\.bin.*no sidecar"):
        open_rows(path, T=T, valid_tokens=0, split_seed=0, vocab_size=V)
    with pytest.raises(TokenFileError, match="does not exist"):
        open_rows(tmp_path / "absent.bin", T=T, valid_tokens=0, split_seed=0, vocab_size=V)


def test_truncated_token_file_is_an_error(tmp_path):
    path = write_token_file(tmp_path / "cut.bin", 10 * T, vocab_size=V)
    with open(path, "r+b") as f:
        f.truncate(10 * T * 2 - 2)
    with pytest.raises(TokenFileError, match=r"cut\.bin.*incomplete"):
        open_rows(path, T=T, valid_tokens=0, split_seed=0, vocab_size=V)


def test_uint32_token_files_give_int32_rows_with_ids_past_uint16(tmp_path):
    ids = np.arange(65_530, 65_530 + 4 * T)  # crosses 65,535
    path = write_token_file(tmp_path / "big.bin", ids.size, vocab_size=70_000, tokens=ids, dtype="uint32")
    rows = open_rows(path, T=T, valid_tokens=0, split_seed=0, vocab_size=70_000)
    got = rows.rows(np.arange(4))
    assert got.dtype == np.int32 and got[:, 1:].tolist() == ids.reshape(4, T)[:, 1:].tolist()
    with pytest.raises(DataError, match="set model.V >= 70000"):
        open_rows(path, T=T, valid_tokens=0, split_seed=0, vocab_size=65_536)
