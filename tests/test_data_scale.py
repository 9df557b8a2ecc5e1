"""anllm.data at scale: retried streaming reads, per-rank/per-worker parts, resume without replay, the
dataset-cache lock without flock, parallel JSONL reading and the pre-build CLI.

Streams are read through the real machinery: a local HTTP server (Range requests) that fails on
purpose, ``torch.utils.data.DataLoader`` workers, and Accelerate's own ``prepare_data_loader`` for
"ranks" (``num_processes=2, process_index=r, dispatch_batches=False``: what each rank of a 2-GPU job
runs). Runtime: about 60-90 s on 2 CPU cores (DataLoader workers, forked builders, one tiny
training step).
"""

from __future__ import annotations

import errno
import fcntl
import http.server
import json
import logging
import multiprocessing as mp
import os
import re
import socket
import threading
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

import anllm
from anllm.data import build_train_dataset, resume_stream
from anllm.data import processing as processing_mod
from anllm.data import stream as stream_mod
from anllm.data.retry import RetryPolicy, is_transient, iter_lines
from anllm.data.stream import plan_shards
from anllm.utils import FileLock

datasets.disable_progress_bars()

FAST_RETRY = {"attempts": 5, "backoff_s": 0.01, "max_backoff_s": 0.05}
N_WORDS = 240


# --- a word-level tokenizer in which every document is recognisable ------------------------------


def tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <s> </s> <unk> . the cat sat".split() + [f"w{i}" for i in range(N_WORDS)]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_tokens([AddedToken("<AC>", special=True, normalized=False)], special_tokens=True)
    return tok


W0 = 8  # id of "w0"


def ac(tok) -> anllm.AnchorConfig:
    return anllm.AnchorConfig(mode="ac", anchor_token="<AC>", anchor_token_ids=[tok.convert_tokens_to_ids("<AC>")])


def doc_text(i: int) -> str:
    """Document i: "w<i>" first, then a length that varies with i (so packing cuts everywhere)."""
    return f"w{i} the cat sat. " + " ".join(f"w{(i * 7 + k) % N_WORDS}" for k in range(i % 9)) + "."


def write_corpus(root: Path, n_docs: int, n_files: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"part{f}.jsonl" for f in range(n_files)]
    for f, path in enumerate(paths):
        with open(path, "w") as fh:
            for i in range(f, n_docs, n_files):
                fh.write(json.dumps({"text": doc_text(i), "meta": {"i": i}}) + "\n")
    return paths


def doc_of(row: dict) -> int:
    """The document of an unpacked row: its first word after BOS is w<i>."""
    return row["input_ids"][1] - W0


def row_id(row: dict) -> tuple[int, ...]:
    return tuple(row["input_ids"])


# --- retries: a flaky HTTP server ------------------------------------------------------------------


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves files with Range support; the first data requests fail as ``server.failures`` says."""

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes | None:
        path = self.server.root / self.path.lstrip("/")
        return path.read_bytes() if path.is_file() else None

    def do_HEAD(self):
        body = self._body()
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self):
        body = self._body()
        if body is None:
            self.send_error(404)
            return
        start, end = 0, len(body) - 1
        m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else end, len(body) - 1)
        part = body[start:end + 1]
        with self.server.lock:
            failure = self.server.failures.pop(0) if self.server.failures else None
            self.server.requests += 1
        if failure == 503:
            self.send_error(503, "try again later")
            return
        self.send_response(206 if m else 200)
        self.send_header("Content-Length", str(len(part)))
        if m:
            self.send_header("Content-Range", f"bytes {start}-{start + len(part) - 1}/{len(body)}")
        self.end_headers()
        if failure == "cut":  # the connection drops half-way through the body
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(part)


@pytest.fixture
def flaky_server(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    server.root = tmp_path / "www"
    server.failures = []
    server.requests = 0
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_flaky_http_source_fails_twice_then_succeeds(tmp_path, flaky_server, caplog):
    paths = write_corpus(tmp_path / "www", n_docs=30, n_files=2)
    base = f"http://127.0.0.1:{flaky_server.server_port}"
    tok = tokenizer()
    cfg = {"kind": "hub", "data_files": [f"{base}/{p.name}" for p in paths], "shuffle_buffer": 0, "packing": False,
           "retry": FAST_RETRY}
    flaky_server.failures = [503, "cut"]  # the first data request gets a 503, the second loses its connection
    with caplog.at_level(logging.WARNING, logger="anllm.data"):
        stream, _ = build_train_dataset(cfg, tok, ac(tok), 64, tmp_path / "cache")
        rows = list(stream)
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2, retries
    assert "503" in retries[0] and re.search(r"retry 1/4", retries[0])
    assert not flaky_server.failures  # both failures were served
    # the run survived and read every document once, as from local files
    local, _ = build_train_dataset({**cfg, "data_files": [f"file://{p}" for p in paths]}, tok, ac(tok), 64,
                                   tmp_path / "cache")
    assert [row_id(r) for r in rows] == [row_id(r) for r in local]
    assert sorted(doc_of(r) for r in rows) == list(range(30))

    # a failure that persists gives up after `attempts` tries with the server's error
    flaky_server.failures = [503] * 10
    stream, _ = build_train_dataset(cfg, tok, ac(tok), 64, tmp_path / "cache")
    with pytest.raises(Exception, match="503"):
        list(stream)
    # a missing file is not retried
    assert not is_transient(FileNotFoundError("x")) and is_transient(ConnectionResetError())


def test_a_read_that_breaks_mid_file_continues_at_the_byte(tmp_path, monkeypatch, caplog):
    from anllm.data import retry as retry_mod

    lines = [f"line {i}\n".encode() for i in range(50)]
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"".join(lines))
    opened = []

    class Breaking:  # the first handle dies after 7 lines, the second after 20 more
        def __init__(self, fh, n):
            self.fh, self.n = fh, n

        def __iter__(self):
            for i, line in enumerate(self.fh):
                if i == self.n:
                    raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
                yield line

        def seek(self, pos):
            opened.append(pos)
            self.fh.seek(pos)

        def readline(self):
            return self.fh.readline()

        def close(self):
            self.fh.close()

    budget = [7, 20]
    monkeypatch.setattr(retry_mod, "_open", lambda p: Breaking(open(p, "rb"), budget.pop(0) if budget else 10**9))
    sleeps = []
    with caplog.at_level(logging.WARNING, logger="anllm.data"):
        got = [raw for _, _, raw in iter_lines(str(path), 0, None, RetryPolicy(attempts=3, backoff_s=1, max_backoff_s=1.5),
                                             sleep=sleeps.append)]
    assert got == lines  # nothing lost, nothing twice
    assert opened == [len(b"".join(lines[:7])), len(b"".join(lines[:27]))]  # reopened at the byte it stopped
    assert len(sleeps) == 2 and all(0.75 <= s <= 1.25 for s in sleeps)  # progress reset the backoff
    assert sum("ConnectionResetError" in r.getMessage() for r in caplog.records) == 2


def test_byte_range_shards_cover_every_line_once(tmp_path):
    lines = [(f'{{"text": "{"x" * (i % 13)}"}}\n').encode() for i in range(57)]
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"".join(lines))
    size = path.stat().st_size
    for n in (1, 2, 3, 7, 20, 57, 200):
        shards = plan_shards([(str(path), size)], n)
        got = [raw for segs in shards for url, a, b in segs for _, _, raw in iter_lines(url, a, b)]
        assert got == lines, n
    # shards may span files, and keep the files' order
    other = tmp_path / "g.jsonl"
    other.write_bytes(b"".join(lines[:5]))
    shards = plan_shards([(str(path), size), (str(other), other.stat().st_size)], 4)
    got = [raw for segs in shards for url, a, b in segs for _, _, raw in iter_lines(url, a, b)]
    assert got == lines + lines[:5]


# --- 2 ranks x 2 DataLoader workers ------------------------------------------------------------------


def _worker_collate(rows):
    info = torch.utils.data.get_worker_info()
    return {"worker": info.id if info else 0, "rows": rows}


def _rank_loader(ds, rank: int, world: int, workers: int, batch_size: int = 2):
    """The DataLoader rank `rank` of `world` trains on, prepared by Accelerate as the Trainer does."""
    from accelerate.data_loader import prepare_data_loader

    dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_worker_collate)
    if world == 1:
        return dl
    return prepare_data_loader(dl, num_processes=world, process_index=rank, dispatch_batches=False,
                               put_on_device=False)


def _stream_cfg(root: Path, **kw) -> dict:
    return {"kind": "hub", "data_files": [f"file://{root}/*.jsonl"], "shuffle_buffer": 0, "packing": False,
            "shard_mb": 0.0004, **kw}  # ~400-byte shards: a few per part


def test_two_ranks_two_workers_read_disjoint_parts_and_every_row_once(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus", n_docs=120, n_files=3)
    tok = tokenizer()
    ds, _ = build_train_dataset(_stream_cfg(tmp_path / "corpus", shuffle_buffer=50), tok, ac(tok), 64,
                                tmp_path / "cache", world_size=2, num_workers=2)
    spec = ds._anllm_stream[0]
    assert ds.n_shards == 4 and spec.num_shards >= 8 and spec.num_shards % 4 == 0
    docs: dict[tuple[int, int], list[int]] = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        loader = _rank_loader(ds, rank, 2, 2)
        assert isinstance(loader.dataset, datasets.IterableDataset) and loader.dataset.n_shards == 2  # its half
        for batch in loader:
            docs.setdefault((rank, batch["worker"]), []).extend(doc_of(r) for r in batch["rows"])
    assert sorted(docs) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # every consumer read something
    everything = [d for part in docs.values() for d in part]
    assert sorted(everything) == list(range(120))  # together: every row once
    sets = [set(v) for v in docs.values()]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])  # disjoint
    # a part is built for 2 workers per rank: fewer would read parts one after the other (an infinite
    # part would starve the next), so that is refused with a clear message
    with pytest.raises(ValueError, match="built for 2 DataLoader workers per rank but is read by 1"):
        next(iter(_rank_loader(ds, 0, 2, 0)))


# --- resume without replay ----------------------------------------------------------------------------


class DocCounter:
    """Counts documents read by shard readers, across forked DataLoader workers."""

    def __init__(self, monkeypatch):
        self.docs = mp.Value("i", 0)
        self.shards = mp.Value("i", 0)
        original = stream_mod.iter_segment_documents

        def counted(*args, **kwargs):
            with self.shards.get_lock():
                self.shards.value += 1
            for item in original(*args, **kwargs):
                with self.docs.get_lock():
                    self.docs.value += 1
                yield item

        monkeypatch.setattr(stream_mod, "iter_segment_documents", counted)

    def reset(self) -> tuple[int, int]:
        out = (self.docs.value, self.shards.value)
        self.docs.value = self.shards.value = 0
        return out


def _batches(loader) -> list[list[tuple[int, ...]]]:
    return [[row_id(r) for r in b["rows"]] for b in loader]


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 2)])
def test_resumed_stream_continues_at_the_next_row_without_replay(tmp_path, monkeypatch, caplog, world, workers):
    write_corpus(tmp_path / "corpus", n_docs=150, n_files=3)
    tok = tokenizer()
    cfg = _stream_cfg(tmp_path / "corpus", packing=True, shuffle_buffer=8)  # packed rows, shuffled documents
    counter = DocCounter(monkeypatch)
    ds, _ = build_train_dataset(cfg, tok, ac(tok), 16, tmp_path / "cache", world_size=world, num_workers=workers)
    spec = ds._anllm_stream[0]

    def run(dataset) -> list[list[list[tuple[int, ...]]]]:  # per rank: batches of row ids
        out = []
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            out.append(_batches(_rank_loader(dataset, rank, world, workers)))
        return out

    full = run(ds)
    read_full = counter.reset()
    assert all(len(b) > 6 for b in full) and read_full[0] == 150
    ledger = Path(spec.ledger_dir)
    assert len(list(ledger.glob("*.json"))) == spec.num_shards  # every shard's row count

    consumed = 5  # batches per rank the first run trained on before it stopped (odd: the workers' turn matters)
    resumed = resume_stream(ds, batches=consumed, batch_size=2)
    with caplog.at_level(logging.INFO, logger="anllm.data"):
        after = run(resumed)
    read_after = counter.reset()
    for rank in range(world):
        print(f"rank {rank}: first row after resume {after[rank][0][0]}; uninterrupted row {consumed * 2}: "
              f"{full[rank][consumed][0]}")
        assert after[rank] == full[rank][consumed:]  # the next rows, in the same order
    assert read_after[0] < read_full[0] - 10 and read_after[1] < read_full[1]  # earlier shards were not re-read
    if workers == 0:
        assert any(re.search(r"Resumed stream part 0 .*skipped [1-9]\d* shard\(s\) unread", r.getMessage())
                   for r in caplog.records)

    # without the ledger the position is the same (the skipped shards are re-made, then dropped)
    for p in ledger.glob("*.json"):
        p.unlink()
    assert run(resume_stream(ds, batches=consumed, batch_size=2)) == [f[consumed:] for f in full]
    assert counter.reset()[0] == read_full[0]


def test_repeating_stream_resumes_across_passes(tmp_path):
    write_corpus(tmp_path / "corpus", n_docs=40, n_files=2)
    tok = tokenizer()
    cfg = _stream_cfg(tmp_path / "corpus", packing=True, shuffle_buffer=4, repeat=True)
    ds, _ = build_train_dataset(cfg, tok, ac(tok), 16, tmp_path / "cache")
    rows = [row_id(r) for r in islice(ds, 120)]  # more than one pass
    one_pass = len([1 for _ in build_train_dataset({**cfg, "repeat": False}, tok, ac(tok), 16, tmp_path / "c2")[0]])
    assert 0 < one_pass < 100 and rows[:one_pass] != rows[one_pass:2 * one_pass]  # passes are reshuffled
    again = resume_stream(ds, batches=one_pass + 7, batch_size=1)
    assert [row_id(r) for r in islice(again, 20)] == rows[one_pass + 7:one_pass + 27]


# --- the dataset cache without flock -------------------------------------------------------------------


def _no_flock(*args, **kwargs):
    raise OSError(errno.ENOSYS, "Function not implemented")  # what flock says on Lustre mounted without it


def _build_in_child(cache, corpus, barrier, results):
    tok = tokenizer()
    barrier.wait()
    ds, stats = build_train_dataset({"kind": "jsonl", "paths": [str(corpus)]}, tok, ac(tok), 16, cache)
    results.put((os.getpid(), stats.from_cache, [row_id(r) for r in ds]))


def test_two_processes_build_one_cache_without_flock(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", n_docs=40, n_files=1)[0]
    cache = tmp_path / "cache"
    monkeypatch.setattr(fcntl, "flock", _no_flock)  # everywhere, as on Lustre without -o flock (datasets too)
    original = processing_mod.TextProcessor.__call__

    def slow(self, batch):
        time.sleep(1.0)  # the builder holds the lock long enough for the other to find it taken
        return original(self, batch)

    monkeypatch.setattr(processing_mod.TextProcessor, "__call__", slow)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(cache, corpus, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(from_cache for _, from_cache, _ in got) == [False, True]  # one built, the other waited and loaded
    assert got[0][2] == got[1][2] and got[0][2]
    entries = [p for p in cache.iterdir()]
    assert [p.name for p in entries if not p.name.startswith(".")] and all(
        not p.name.startswith((".tmp", ".work")) and not p.name.endswith(".held") for p in entries), entries
    monkeypatch.setattr(processing_mod.TextProcessor, "__call__", original)
    ds, stats = build_train_dataset({"kind": "jsonl", "paths": [str(corpus)]}, tokenizer(), ac(tokenizer()), 16, cache)
    assert stats.from_cache and [row_id(r) for r in ds] == got[0][2]  # the published entry is complete


def test_lock_files_take_over_dead_or_stale_holders(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    path = tmp_path / "x.lock"
    live = FileLock(path, stale_after=1.0)
    assert live.acquire() and live.mode == "file" and live.held_path.is_file()
    t0 = time.monotonic()
    assert not FileLock(path, stale_after=1.0).acquire(blocking=False)  # refreshed by its heartbeat: alive
    assert time.monotonic() - t0 < 1.0
    live.release()
    assert not live.held_path.exists()

    # a holder that died on this host: taken over at once
    dead = mp.get_context("fork").Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    live.held_path.write_text(f"pid {dead.pid} on {socket.gethostname()} since then [x]")
    t0 = time.monotonic()
    lock = FileLock(path, stale_after=60.0)
    assert lock.acquire(blocking=False) and time.monotonic() - t0 < 1.0
    lock.release()
    # a holder elsewhere that stopped refreshing: taken over once stale
    live.held_path.write_text("pid 1 on another-node since then [y]")
    os.utime(live.held_path, (time.time() - 10, time.time() - 10))
    lock = FileLock(path, stale_after=5.0)
    assert lock.acquire(blocking=False)
    lock.release()

    from anllm.train.checkpoints import OutputDirLock

    monkeypatch.setenv("ANLLM_LOCK_STALE_S", "1")  # a convention all runs share
    first = OutputDirLock(tmp_path / "out").acquire()
    with pytest.raises(RuntimeError, match=r"Another training run \(pid \d+ on"):
        OutputDirLock(tmp_path / "out").acquire()
    first.release()
    OutputDirLock(tmp_path / "out").acquire().release()


# --- parallel reading --------------------------------------------------------------------------------------


def test_parallel_json_read_gives_the_same_rows_and_counts(tmp_path):
    paths = write_corpus(tmp_path / "corpus", n_docs=90, n_files=3)
    with open(paths[1], "a") as fh:
        fh.write("{broken\n" + json.dumps({"text": "  "}) + "\n")
    tok = tokenizer()
    cfg = {"kind": "jsonl", "paths": [str(p) for p in paths], "holdout_fraction": 0.1}
    one, s1 = build_train_dataset(cfg, tok, ac(tok), 16, tmp_path / "c1")
    two, s2 = build_train_dataset(cfg, tok, ac(tok), 16, tmp_path / "c2", num_proc=2)
    assert one[:] == two[:] and s2.num_proc == 2
    assert (s1.documents, s1.tokens, s1.skipped) == (s2.documents, s2.tokens, s2.skipped)
    assert s2.skipped == {"malformed JSON": 1, "empty document": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content'\]"):
        build_train_dataset({**cfg, "paths": [str(bad), str(paths[0])]}, tok, ac(tok), 16, tmp_path / "c3", num_proc=2)


# --- the pre-build CLI ------------------------------------------------------------------------------------


def test_prebuild_cli_builds_the_entry_the_training_run_loads(tmp_path, monkeypatch, capsys):
    from hydra import compose, initialize_config_dir

    from anllm.data.__main__ import main
    from anllm.train import run
    from anllm.schema import CONF_DIR

    overrides = ["+exp=anllm_ac", "model=tiny", "data=demo", "data.max_documents=40", "data.holdout_fraction=0",
                 "heldout.enabled=false", f"cache_dir={tmp_path / 'cache'}", "block_size=64"]
    builds = []
    original = processing_mod.TextProcessor.__call__
    monkeypatch.setattr(processing_mod.TextProcessor, "__call__",
                        lambda self, batch: builds.append(1) or original(self, batch))
    with pytest.raises(SystemExit) as done:
        main(["build", *overrides])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "built now" in out and builds
    n_build = len(builds)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"output_dir={tmp_path / 'run'}", "trainer.max_steps=1",
                                          "trainer.report_to=none", "trainer.disable_tqdm=true"])
    result = run(cfg)
    assert result.global_step == 1
    assert len(builds) == n_build  # the run tokenised nothing: it loaded the pre-built entry
    assert result.data_stats.from_cache and result.data_stats.cache_path in out


# --- a real training run on a stream, crashed and resumed (needs the runner to use resume_stream) -------------


def _runner_resumes_streams() -> bool:
    import inspect

    from anllm.train import runner

    return "resume_stream" in inspect.getsource(runner)


@pytest.mark.skipif(not _runner_resumes_streams(), reason="anllm.train.runner does not resume streams yet")
def test_a_resumed_streamed_training_run_trains_on_the_rows_it_had_not_seen(tmp_path):
    from hydra import compose, initialize_config_dir
    from transformers import TrainerCallback

    from anllm.data import demo_documents
    from anllm.train import run
    from anllm.schema import CONF_DIR

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = list(demo_documents())[:90]
    for f in range(3):
        with open(corpus / f"part{f}.jsonl", "w") as fh:
            fh.writelines(json.dumps({"text": d}) + "\n" for d in docs[f::3])

    class Rows(TrainerCallback):
        """Row ids the model is trained on (first tokens of each micro-batch), logged in order."""

        def __init__(self, crash_at: int | None = None):
            self.rows, self.crash_at = [], crash_at

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(
                lambda m, a, kw: self.rows.append(tuple(kw["input_ids"][0, :12].tolist())), with_kwargs=True)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.crash_at:
                raise RuntimeError("simulated preemption")
            return control

    def cfg(out):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=[
                "+exp=anllm_ac", "model=tiny", "data=redpajama_sample", f"data.data_files=[file://{corpus}/*.jsonl]",
                "data.shard_mb=0.005", "data.shuffle_buffer=8", "block_size=32", f"output_dir={out}",
                f"cache_dir={tmp_path / 'cache'}", "heldout.enabled=false", "trainer.report_to=none",
                "trainer.disable_tqdm=true", "trainer.max_steps=6", "trainer.save_steps=3",
                "trainer.gradient_accumulation_steps=3", "trainer.dataloader_num_workers=2",
                "trainer.gradient_checkpointing=false", "trainer.learning_rate=1e-3", "trainer.warmup_steps=2"])

    full = Rows()
    run(cfg(tmp_path / "full"), callbacks=[full])
    crashed = Rows(crash_at=4)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(cfg(tmp_path / "crash"), callbacks=[crashed])
    resumed = Rows()
    result = run(cfg(tmp_path / "crash"), callbacks=[resumed])
    assert result.resumed_from.endswith("checkpoint-3") and result.global_step == 6
    assert len(full.rows) == 18 and crashed.rows == full.rows[:12]  # 6 steps x 3 micro-batches of 1 row
    print("row ids after resume:", resumed.rows[:2], "uninterrupted rows 9-10:", full.rows[9:11])
    # steps 4-6: the rows the uninterrupted run trained on (9 batches in, so worker 1's turn), nothing replayed
    assert resumed.rows == full.rows[9:]
