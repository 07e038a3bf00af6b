"""Finetuning with replay: parent resolution, the start of finetuning (KL(pi||pi) = 0), every
method at coefficient 0 = plain finetuning, replay sources (real rows from the parent's train split,
self-generated rows from the frozen parent), the regulariser reducing forgetting, the diagonal
Fisher, and resuming a self-generated-replay run.

One tiny parent (D=32, L=2, V=64, T=32) is pretrained per session (finetune_fixtures); each
finetuning run is 16 steps of 8 rows and is written once and shared by the tests that read it.
"""

from __future__ import annotations

import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib import __main__ as cli, config as config_lib, runs
from forgetting_lib.config import ConfigError, ModelConfig
from forgetting_lib.engine import (
    checkpoint,
    data as data_lib,
    finetune as finetune_lib,
    replay as replay_lib,
    train as train_lib,
)
from forgetting_lib.engine.assemble import build_setup
from forgetting_lib.engine.finetune import FinetuneError, load_parent, resolve
from forgetting_lib.engine.losses import ntp_loss
from forgetting_lib.engine.model import abstract_params, make_forward, make_hidden
from forgetting_lib.engine.regularisers import REGULARISERS
from forgetting_lib.engine.sampling import sample_from_id
from forgetting_lib.engine.step import auto_microbatches
from forgetting_lib.engine.train import train_and_evaluate

from finetune_fixtures import (  # noqa: F401 - world is a fixture
    FT_STEPS,
    OLD_TOKEN,
    PARENT_SEED,
    PARENT_SPLIT_SEED,
    PARENT_VALID_TOKENS,
    B,
    T,
    V,
    successor_map,
    world,
)

# Every metric that is a function of the parameters and data (not of timing).
LOSS_COLUMNS = (
    "step",
    "tokens",
    "valid_ntp",
    "valid_ntp_h2",
    "valid_kl",
    "prev_ntp",
    "prev_ntp_h2",
    "prev_kl",
    "drift",
    "forgetting",
    "weight_norm",
    "train_ntp",
)
FINETUNE_COLUMNS = (
    "valid_ntp",
    "valid_kl",
    "prev_ntp",
    "prev_kl",
    "prev_ntp_h2",
    "valid_ntp_h2",
    "drift",
    "forgetting",
    "train_reg",
    "sample_time_s",
)
KL = {"reg.method": "kl_pre", "reg.coeff": 10.0}
SYNTH = {
    **KL,
    "reg.synth": True,
    "reg.buffer": 3,
    "log.checkpoint_every_tokens": 8 * B * T,
}  # checkpoints at steps 8 and 16


def metrics(result) -> list[dict]:
    return runs.read_metrics(result.out_dir)


def loss_rows(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in LOSS_COLUMNS} for r in rows]


@pytest.fixture(scope="module")
def plain(world):
    """Finetuning without regulariser."""
    return world.finetune("none")


@pytest.fixture(scope="module")
def kl_real(world):
    return world.finetune("kl_pre_real", KL)


class RecordingReplay(replay_lib.SelfGeneratedReplay):
    """SelfGeneratedReplay that keeps every batch the training loop asked for."""

    instances: list["RecordingReplay"] = []

    def batch(self, step: int) -> jax.Array:
        rows = super().batch(step)
        self.__dict__.setdefault("seen", {})[step] = np.asarray(rows)
        RecordingReplay.instances.append(self)
        return rows


@pytest.fixture(scope="module")
def kl_synth(world):
    """Self-generated KL replay (buffer 3, so 16 steps refill 6 times), with the replay object
    the loop used and every batch it drew."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(replay_lib, "SelfGeneratedReplay", RecordingReplay)
        RecordingReplay.instances.clear()
        result = world.finetune("kl_pre_synth", SYNTH)
    used = {id(r): r for r in RecordingReplay.instances}
    assert len(used) == 1, "the run should build exactly one replay source"
    return result, next(iter(used.values()))


def parent_summary(world) -> dict:
    return runs.read_summary(world.parent)


# --- resolution: the child reads the architecture and the split from its parent --------------


def test_resolved_config_records_parent(world, plain):
    cfg = config_lib.load(plain.out_dir / runs.CONFIG)
    assert (cfg.model.D, cfg.model.L, cfg.model.H, cfg.model.V) == (32, 2, 16, V)  # not defaults
    p = cfg.parent
    assert p.data_path == str(world.old) and p.split_seed == PARENT_SPLIT_SEED and p.T == T
    assert p.valid_tokens == PARENT_VALID_TOKENS and p.seed == PARENT_SEED
    assert p.final_valid_ntp == parent_summary(world)["final"]["valid_ntp"]
    assert cfg.data.split_seed == 7 and cfg.data.path == str(world.new)  # the child's own split


def test_load_path_must_be_a_finished_run(world, tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FinetuneError, match=str(missing)):
        resolve(world.child_config(parent=missing))
    unfinished = tmp_path / "crashed"
    unfinished.mkdir()
    shutil.copy(world.parent / runs.CONFIG, unfinished / runs.CONFIG)
    with pytest.raises(FinetuneError, match=str(unfinished)):
        resolve(world.child_config(parent=unfinished))
    runs.write_summary(unfinished, {"status": "failed"})
    with pytest.raises(FinetuneError, match="failed"):
        resolve(world.child_config(parent=unfinished))


def test_row_length_must_match_parent(world):
    with pytest.raises(FinetuneError, match=f"data.T={T}"):
        resolve(world.child_config({"data.T": 16}))


def test_replay_without_parent_is_config_error():
    base = {"data": {"path": "x.bin"}, "stop": {"num_tokens_train": 100}}
    with pytest.raises(ConfigError, match="model.load_path"):
        config_lib.from_dict(base, [("reg.method", "kl_pre"), ("reg.coeff", 1.0)])
    with pytest.raises(ConfigError, match="model.load_path"):
        config_lib.from_dict(base, [("lora.rank", 4)])


def test_cli_reports_bad_load_path_as_user_error(world, tmp_path, capsys):
    params = tmp_path / "ft.yaml"
    config_lib.dump(world.child_config(), params)
    missing = tmp_path / "no_such_run"
    status = cli.main(["train", str(params), f"model.load_path={missing}", "--out", str(tmp_path / "out")])
    assert status == 2 and str(missing) in capsys.readouterr().err


def _parent_with_data_moved(world, tmp_path):
    """A copy of the parent run whose training token file no longer exists."""
    copy = tmp_path / "parent_copy"
    shutil.copytree(world.parent, copy)
    raw = runs.read_config(copy)
    raw["data"]["path"] = str(tmp_path / "gone.bin")
    config_lib.dump(raw, copy / runs.CONFIG)
    return copy


def test_real_replay_needs_parent_data(world, tmp_path):
    parent = _parent_with_data_moved(world, tmp_path)
    cfg = resolve(world.child_config(KL, parent=parent))
    with pytest.raises(data_lib.DataError, match="reg.synth=true") as err:
        build_setup(cfg)
    assert str(tmp_path / "gone.bin") in str(err.value)


def test_following_the_missing_data_advice_works(world, tmp_path):
    parent = _parent_with_data_moved(world, tmp_path)
    with pytest.raises(data_lib.DataError) as err:
        build_setup(resolve(world.child_config(KL, parent=parent)))
    if "reg.synth=true" in str(err.value):
        build_setup(resolve(world.child_config({**KL, "reg.synth": True}, parent=parent)))


def test_replay_batch_larger_than_parent_train_split(world):
    n_train = 400 - PARENT_VALID_TOKENS // T
    cfg = resolve(world.child_config({**KL, "reg.replay_batch_size": n_train + 8}))
    with pytest.raises(data_lib.DataError, match=f"{n_train} rows"):
        build_setup(cfg)
    # self-generated replay has no such limit
    build_setup(resolve(world.child_config({**KL, "reg.synth": True, "reg.replay_batch_size": n_train + 8})))


# --- the start of finetuning: the model is its parent -----------------------------------------


def test_step0_is_the_parent(world, plain, kl_real):
    final = parent_summary(world)["final"]
    for result in (plain, kl_real):
        row = metrics(result)[0]
        assert row["step"] == 0
        assert row["prev_kl"] == 0.0 and row["valid_kl"] == 0.0  # KL(pi || pi) = 0
        assert row["drift"] == 0.0
        assert abs(row["forgetting"]) < 1e-6
        assert row["prev_ntp"] == pytest.approx(final["valid_ntp"], abs=1e-6)  # the same rows
        assert row["prev_ntp_h2"] == pytest.approx(final["valid_ntp_h2"], abs=1e-6)


def test_finetuning_metrics_columns(plain, kl_real, kl_synth):
    synth = kl_synth[0]
    for result in (plain, kl_real, synth):
        rows = metrics(result)
        assert [r["step"] for r in rows] == [0, 4, 8, 12, FT_STEPS]
        for row in rows:
            missing = [c for c in FINETUNE_COLUMNS if c not in row]
            assert not missing, f"{result.out_dir.name}: {missing}"
        assert rows[0]["train_reg"] is None
    assert all(r["sample_time_s"] == 0 for r in metrics(plain) + metrics(kl_real))
    assert metrics(synth)[-1]["sample_time_s"] > 0
    assert all(r["train_reg"] == 0 for r in metrics(plain)[1:])
    assert all(r["train_reg"] > 0 for r in metrics(kl_real)[1:] + metrics(synth)[1:])


def test_eval_kl_off_skips_only_the_kl_metrics(world, kl_real):
    lean = metrics(world.finetune("kl_pre_real_no_eval_kl", {**KL, "log.eval_kl": False}))
    full = metrics(kl_real)
    assert not any(k.endswith("_kl") for row in lean for k in row)
    assert all(k in full[-1] for k in ("valid_kl", "prev_kl"))
    for a, b in zip(lean, full):  # training and every loss are unchanged
        assert a["step"] == b["step"] and a["drift"] == pytest.approx(b["drift"], rel=1e-6)
        for key in ("valid_ntp", "prev_ntp", "forgetting", "train_ntp", "train_reg"):
            assert a[key] == (None if b[key] is None else pytest.approx(b[key], rel=1e-6)), key


def test_teacher_cache_budget_changes_no_number(world, kl_real):
    """With no memory for the parent's cached outputs, evaluation re-runs the parent each time
    (the `params` form); every logged number is the one the cached parent gave."""
    recomputed = metrics(world.finetune("kl_pre_real_no_cache", {**KL, "log.teacher_cache_mb": 0}))
    cached = metrics(kl_real)
    assert [r["step"] for r in recomputed] == [r["step"] for r in cached]
    for a, b in zip(recomputed, cached):
        for key in ("valid_kl", "prev_kl", "valid_ntp", "prev_ntp", "train_reg"):
            assert a[key] == (None if b[key] is None else pytest.approx(b[key], rel=1e-5, abs=1e-7)), key
    assert cached[0]["valid_kl"] == 0.0 and cached[0]["prev_kl"] == 0.0  # step 0: the model is the parent


def test_summary_counts_sampled_rows(plain, kl_real, kl_synth):
    result, used = kl_synth
    assert runs.read_summary(plain.out_dir)["sampled_rows"] == 0
    assert runs.read_summary(kl_real.out_dir)["sampled_rows"] == 0
    sampled = runs.read_summary(result.out_dir)["sampled_rows"]
    assert sampled == used.sampled_rows and sampled >= FT_STEPS * used.batch_size


# --- every method at coefficient 0 is plain finetuning ----------------------------------------

# every regulariser of the registry (real rows), and one on self-generated rows
ZERO_COEFF = [(name, False) for name in REGULARISERS if name != "none"] + [("ntp_pre", True)]


def zero_coeff_run(world, method: str, synth: bool):
    return world.finetune(
        f"{method}_synth{int(synth)}_zero",
        {
            "reg.method": method,
            "reg.coeff": 0.0,
            "reg.synth": synth,
            "reg.buffer": 4,
            "reg.fisher_batches": 2,
        },
    )


@pytest.mark.parametrize("method,synth", ZERO_COEFF)
def test_zero_coefficient_is_bitwise_plain_finetuning(world, plain, method, synth):
    assert loss_rows(metrics(zero_coeff_run(world, method, synth))) == loss_rows(metrics(plain))


# --- the regulariser reduces forgetting ---------------------------------------------------------


def test_kl_replay_reduces_forgetting(plain, kl_real, kl_synth):
    plain_row = metrics(plain)[-1]
    assert plain_row["forgetting"] > 1.0  # plain finetuning on the new chain overwrites the old
    for result in (kl_real, kl_synth[0]):
        rows = metrics(result)
        assert rows[-1]["forgetting"] < 0.1 * plain_row["forgetting"], result.out_dir.name
        assert rows[-1]["prev_kl"] < 0.1 * plain_row["prev_kl"]
        assert rows[-1]["valid_ntp"] < rows[0]["valid_ntp"] - 2.0  # and it still learns


# --- replay sources -------------------------------------------------------------------------------


def _contents(rows: np.ndarray) -> set[bytes]:
    return {row[1:].tobytes() for row in np.asarray(rows, np.int32)}


def test_real_replay_rows_are_parent_train_rows(world):
    setup = build_setup(resolve(world.child_config(KL)))
    old = data_lib.open_rows(
        world.old, T=T, valid_tokens=PARENT_VALID_TOKENS, split_seed=PARENT_SPLIT_SEED, vocab_size=V
    )
    train, valid = _contents(old.rows(old.train_rows)), _contents(old.rows(old.valid_rows))
    assert len(train) == len(old.train_rows) and not train & valid  # contents identify rows
    assert _contents(np.asarray(setup.eval_sets["prev"][0]).reshape(-1, T)) == valid
    steps_per_epoch = len(old.train_rows) // B
    epoch = np.concatenate([setup.replay.batch(s) for s in range(steps_per_epoch)])  # [n, T]
    assert epoch.shape == (len(old.train_rows), T)
    assert np.all(epoch[:, 0] == OLD_TOKEN)
    assert _contents(epoch) == train  # one epoch = every train row once, no valid row
    later = np.concatenate([setup.replay.batch(s) for s in range(steps_per_epoch, 2 * steps_per_epoch + 3)])
    assert _contents(later) <= train and not _contents(later) & valid


@pytest.fixture(scope="module")
def frozen_parent(world):
    cfg = resolve(world.child_config())
    return abstract_params(cfg.model)[0], load_parent(cfg).params


def _sgr(graphdef, params, seed: int, sampler=None, buffer: int = 3, rows: int = 4):
    return replay_lib.SelfGeneratedReplay(
        graphdef, params, OLD_TOKEN, rows, T, buffer, jax.random.key(seed), _sampler=sampler
    )


def test_self_generated_rows(frozen_parent):
    graphdef, params = frozen_parent
    a = _sgr(graphdef, params, seed=0)
    chunk = np.stack([np.asarray(a.batch(s)) for s in range(3)])  # [buffer, R, T]
    assert chunk.shape == (3, 4, T) and a.sample_time_s > 0
    assert np.all(chunk[..., 0] == OLD_TOKEN) and chunk.min() >= 0 and chunk.max() < V
    # one sampler call per chunk of buffer x R rows, each row used once, in order
    expected = sample_from_id(a._sampler, params, OLD_TOKEN, 12, jax.random.fold_in(a.key, 0))
    np.testing.assert_array_equal(chunk.reshape(12, T), expected)
    assert len(_contents(chunk.reshape(12, T))) == 12
    # a pure function of (key, step): a fresh object, asked out of order, gives the same rows
    b = _sgr(graphdef, params, seed=0, sampler=a._sampler)
    later = np.asarray(a.batch(7))
    np.testing.assert_array_equal(b.batch(7), later)
    np.testing.assert_array_equal(b.batch(1), chunk[1])
    assert not np.array_equal(_sgr(graphdef, params, seed=1, sampler=a._sampler).batch(1), chunk[1])
    # the rows follow the parent's distribution: mostly the old chain's transitions
    successor = successor_map(seed=0)
    follows = successor[chunk[..., 1:-1]] == chunk[..., 2:]
    assert follows.mean() > 0.5  # the data: 0.8; a uniform sampler: 1/60


def test_reused_rows_are_the_chunk_reshuffled(frozen_parent):
    """reuse=2: a chunk serves 2 x buffer steps; the second pass replays the first pass's rows,
    each once, in another order; then a new chunk. Half as many rows are sampled, and a fresh
    source asked out of order gives the same rows."""
    graphdef, params = frozen_parent
    a = replay_lib.SelfGeneratedReplay(
        graphdef, params, OLD_TOKEN, 4, T, 3, jax.random.key(0), reuse=2, seed=1
    )
    rows = [np.asarray(a.batch(s)) for s in range(12)]  # steps 0..11: chunks 0 and 1
    first, second = np.concatenate(rows[:3]), np.concatenate(rows[3:6])  # [12, T] each
    once = np.stack(rows[:3])
    plain = _sgr(graphdef, params, seed=0, sampler=a._sampler)
    np.testing.assert_array_equal(once, np.stack([plain.batch(s) for s in range(3)]))  # pass 0 = reuse 1
    assert _contents(second) == _contents(first) and len(_contents(first)) == 12
    assert not np.array_equal(second, first)  # reshuffled
    assert not _contents(np.concatenate(rows[6:])) & _contents(first)  # chunk 1 is new rows
    assert a.sampled_rows == 2 * 12 and a.span == 6 and a.ready(11) and not a.ready(12)
    b = replay_lib.SelfGeneratedReplay(
        graphdef, params, OLD_TOKEN, 4, T, 3, jax.random.key(0), reuse=2, seed=1, _sampler=a._sampler
    )
    np.testing.assert_array_equal(b.batch(10), rows[10])
    np.testing.assert_array_equal(b.batch(4), rows[4])


def test_run_keeps_the_rows_it_replayed(world, kl_synth):
    """replay_rows.npy holds the replay batches of the run's first steps, exactly as replayed."""
    result, used = kl_synth
    kept = runs.read_replay_rows(result.out_dir)
    steps = len(kept) // used.batch_size
    assert steps == FT_STEPS  # the run is shorter than KEPT_REPLAY_ROWS rows: all of it
    np.testing.assert_array_equal(kept, np.concatenate([used.seen[s] for s in range(steps)]))
    assert runs.read_replay_rows(world.finetune("none").out_dir) is None  # no replay, nothing kept


def test_kept_replay_steps_span_a_chunk_within_what_is_available():
    keep = train_lib.kept_replay_steps
    n = train_lib.KEPT_REPLAY_ROWS
    assert keep(8, 16, None) == list(range(n // 8))  # the rows fill more than a chunk's span
    assert keep(8, 16, 10) == list(range(10))  # a 10-step run (or first sampler call)
    spread = keep(n // 4, 64, 256)  # 4 steps' rows spread over a 64-step span (reuse 4 x buffer 16)
    assert spread == [0, 21, 42, 63]
    assert keep(n // 4, 64, 32) == [0, 10, 21, 31]  # ... but the first call gives 32 steps only
    assert keep(n, 1, None) == [0] and keep(3 * n, 1, None) == [0]  # one step holds enough


def test_keeping_replay_rows_changes_nothing_a_run_computes(world, kl_synth):
    """The same self-generated run without keeping its rows: every loss identical (the kept rows
    are the ones the first steps replay; nothing else is sampled or reordered)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lib, "_keep_replay_rows", lambda *args: None)
        result = train_and_evaluate(world.child_config(SYNTH), world.root / "kl_pre_synth_unkept")
    assert runs.read_replay_rows(result.out_dir) is None
    assert loss_rows(metrics(result)) == loss_rows(metrics(kl_synth[0]))


def test_reuse_and_top_p_reach_the_sampler(world):
    setup = build_setup(resolve(world.child_config({**SYNTH, "reg.reuse": 4, "reg.top_p": 0.5})))
    assert (setup.replay.reuse, setup.replay.top_p, setup.replay.seed) == (4, 0.5, 5)
    for key, value in (("reg.reuse", 0), ("reg.top_p", 0.0), ("reg.top_p", 1.5)):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            world.child_config({**SYNTH, key: value})


def test_auto_chunks_per_call_fills_a_call_within_bounds():
    target = replay_lib.SAMPLE_ROWS  # the CPU's rows per call
    assert replay_lib.auto_chunks_per_call(32, None, 1) == target // 32  # unknown length: fill a call
    assert replay_lib.auto_chunks_per_call(32, 3, 1) == 3  # never past the run's last chunk
    assert replay_lib.auto_chunks_per_call(4 * target, None, 1) == 1  # a chunk bigger than a call
    per_row = replay_lib.SAMPLE_CACHE_BYTES // 64  # a KV cache that allows only 64 rows
    assert replay_lib.auto_chunks_per_call(32, None, per_row) == 2


def test_self_generated_replay_samples_the_frozen_parent(world, kl_synth):
    """Rows sampled during training (after the trained model has moved away from the parent)
    equal rows sampled afterwards from the parent checkpoint read from disk, one chunk per call
    where the run sampled several chunks per call."""
    result, used = kl_synth
    assert sorted(used.seen) == list(range(FT_STEPS))
    parent_params = load_parent(resolve(world.child_config(SYNTH))).params
    fresh = replay_lib.SelfGeneratedReplay(
        used.graphdef,
        parent_params,
        used.prompt,
        used.batch_size,
        T,
        used.buffer,
        used.key,
    )
    assert used.chunks_per_call > 1 and fresh.chunks_per_call == 1
    for step, rows in used.seen.items():
        assert np.all(rows[:, 0] == OLD_TOKEN)
        np.testing.assert_array_equal(fresh.batch(step), rows, err_msg=f"step {step}")
    assert not np.array_equal(used.seen[0], used.seen[1])  # each step gets new rows


# --- EWC -------------------------------------------------------------------------------------------


def test_diagonal_fisher_matches_naive():
    """Against per-row gradients of the unfused loss, on a random 1-block model."""
    graphdef, shapes = abstract_params(ModelConfig(D=16, L=1, H=8, V=V, dtype="float32"))
    draw = np.random.default_rng(3)
    params = jax.tree.map(lambda s: jnp.asarray(draw.normal(0, 0.5, s.shape), s.dtype), shapes)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, V, (2, 8)).astype(np.int32) for _ in range(2)]
    fisher = replay_lib.diagonal_fisher(make_hidden(graphdef), params, batches)
    assert jax.tree.structure(fisher) == jax.tree.structure(params)
    forward = make_forward(graphdef)
    row_grad = jax.jit(jax.grad(lambda p, row: ntp_loss(forward(p, row[None]), row[None])))
    rows = np.concatenate(batches)
    naive = jax.tree.map(
        lambda *g: np.mean(np.square(np.stack(g)), axis=0),
        *[jax.device_get(row_grad(params, row)) for row in rows],
    )
    for got, want in zip(jax.tree.leaves(fisher), jax.tree.leaves(naive)):
        assert float(jnp.min(got)) >= 0
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-9)
    assert float(sum(jnp.sum(x) for x in jax.tree.leaves(fisher))) > 0


# --- resuming ---------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands in for SIGKILL: nothing in the loop catches it or writes anything on the way out."""


def test_resume_self_generated_replay_matches_uninterrupted(world, kl_synth):
    reference = metrics(kl_synth[0])
    out = world.root / "kl_pre_synth_interrupted"
    cfg = world.child_config(SYNTH)
    append = runs.append_metrics

    def append_then_die(run_dir, row):
        append(run_dir, row)
        if row["step"] == 12:  # after the step-8 checkpoint, before the next one
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "append_metrics", append_then_die)
        with pytest.raises(Interrupted):
            train_and_evaluate(cfg, out)
    assert runs.read_summary(out) is None
    assert checkpoint.read_meta(out / runs.CHECKPOINT)["tracker"]["step"] == 8
    assert [r["step"] for r in runs.read_metrics(out)] == [0, 4, 8, 12]
    result = train_and_evaluate(cfg, out, resume=True)
    assert result.status == "finished" and result.step == FT_STEPS
    assert loss_rows(runs.read_metrics(out)) == loss_rows(reference)  # step-12 row recomputed once


# --- gradient accumulation ----------------------------------------------------------------------------


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the slice search runs on CPU only")
def test_auto_microbatches_small_batch():
    def timeout(*_):
        raise TimeoutError("auto_microbatches(8, 32) did not return within 0.5 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        count = auto_microbatches(8, 32)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert count == 1
    assert auto_microbatches(8, 32, replay_rows=8) == 1


# --- reading finished runs back (what notebook 04 shows) ----------------------------------------


def test_final_table_has_one_row_per_run_with_forgetting(world, plain, kl_real):
    table = runs.final_table([plain.out_dir, kl_real.out_dir, world.parent])
    assert list(table.index) == [plain.out_dir.name, kl_real.out_dir.name, world.parent.name]
    assert table.loc[plain.out_dir.name, "forgetting"] == pytest.approx(plain.final["forgetting"])
    assert table.loc[kl_real.out_dir.name, "valid_ntp"] == pytest.approx(kl_real.final["valid_ntp"])
    assert np.isnan(table.loc[world.parent.name, "forgetting"])  # a pretraining run has none
    assert (table["status"] == "finished").all()


def test_load_run_gives_the_final_parameters(world, plain):
    cfg, graphdef, params = finetune_lib.load_run(plain.out_dir)
    assert cfg.model.load_path == str(world.parent)
    parent = load_parent(resolve(cfg))
    _, _, parent_params = finetune_lib.load_run(world.parent)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), parent.params, parent_params))
    forward = make_forward(graphdef)
    assert np.isfinite(np.asarray(forward(params, jnp.ones((1, T), jnp.int32)))).all()


def test_replay_examples_are_prompted_by_the_id_token(world):
    ex = finetune_lib.replay_examples(world.parent, 3, seed=1)
    assert ex["self_generated"].shape == ex["real"].shape == (3, T)
    assert (ex["self_generated"][:, 0] == OLD_TOKEN).all() and (ex["real"][:, 0] == OLD_TOKEN).all()
    again = finetune_lib.replay_examples(world.parent, 3, seed=1)
    assert (again["self_generated"] == ex["self_generated"]).all()  # a seed fixes the rows
