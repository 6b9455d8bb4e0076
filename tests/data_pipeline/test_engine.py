"""Dedup in bounded memory and the engines: the same documents removed as the sequential global pass, the same
bytes for any engine and number of workers, faults (a killed worker, a relaunch), exact accounting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.clean import clean_text, quality_reason
from data_pipeline.config import DataConfig, DedupConfig, FilterConfig, SourceConfig
from data_pipeline.dedup import (
    Deduplicator,
    band_groups,
    band_run,
    exact_duplicates,
    exact_key,
    exact_run,
    lsh_params,
    permutations,
    resolve_near,
    signature,
)
from data_pipeline.pii import scrub
from data_pipeline.prepare import prepare
from data_pipeline.shards import MANIFEST
from data_pipeline.sources import Document, iter_file_docs, resolve_files
from tests.helpers import REPO
from tokenizer.tokenizer import Tokenizer

FILLER = (
    "서울의 봄은 짧고 여름은 길다. 한강 공원에는 자전거를 타는 사람이 많다. 시장에서는 제철 과일을 판다. "
    "도서관은 밤늦게까지 문을 연다. 지하철 노선은 해마다 늘어난다. 산책로 옆으로 오래된 느티나무가 서 있다. "
    "박물관에서는 조선 시대의 도자기를 전시한다. 골목마다 작은 식당이 있고 점심때면 줄이 길다. "
).split(". ")


def quiet(*_):
    pass


def varied_doc(rng: np.random.Generator, n: int = 12) -> str:
    """A Korean paragraph of shuffled sentences with numbers: long, varied, passes the default quality rules."""
    return ". ".join(f"{rng.choice(FILLER)} {int(rng.integers(10_000))}번" for _ in range(n)) + "."


def edit(rng: np.random.Generator, text: str) -> str:
    """A light edit (one word replaced): a near duplicate."""
    words = text.split()
    words[int(rng.integers(len(words)))] = "변경"
    return " ".join(words)


def sequential_dedup(sigs: list, keys: list[bytes], cfg: DedupConfig) -> list[str | None]:
    ref = Deduplicator(cfg)
    return [ref.check(k, s) for k, s in zip(keys, sigs, strict=True)]


def bucketed_dedup(sigs: list, keys: list[bytes], cfg: DedupConfig, files: int) -> list[str | None]:
    """The bounded-memory path on documents spread over `files` files, reducers over 3 bucket ranges."""
    n = len(keys)
    per_file = np.array_split(np.arange(n), files)
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    ordinal = {}
    exact_runs, band_runs = [], []
    for t, idx in enumerate(per_file):
        ords = np.array([(t << 32) | k for k in range(len(idx))], dtype=np.uint64)
        ordinal.update({int(o): int(i) for o, i in zip(ords, idx, strict=True)})
        exact_runs.append(exact_run(np.stack([np.frombuffer(keys[i], np.uint8) for i in idx]), ords))
        has = [sigs[i] is not None for i in idx]
        sig = np.stack([sigs[i] for i in idx if sigs[i] is not None]) if any(has) else np.zeros((0, cfg.num_perm))
        band_runs.append(band_run(sig.astype(np.uint64), ords[np.array(has, bool)], bands, rows))
    ranges = [(0, 100), (100, 700), (700, 1024)]
    exact = np.sort(
        np.concatenate(
            [exact_duplicates(np.concatenate([r[o[lo] : o[hi]] for r, o in exact_runs])) for lo, hi in ranges]
        )
    )
    groups, members, base = [], [], 0
    for lo, hi in ranges:
        rec = np.concatenate([r[o[lo] : o[hi]] for r, o in band_runs])
        rec = rec[~np.isin(rec["ord"], exact)]
        g, m = band_groups(rec, rows)
        groups.append(g + base)
        members.append(m)
        base += int(g.max()) + 1 if len(g) else 0
    near = resolve_near(np.concatenate(groups), np.concatenate(members))
    out: list[str | None] = [None] * n
    for o in exact.tolist():
        out[ordinal[o]] = "exact_duplicate"
    for o in near.tolist():
        out[ordinal[o]] = "near_duplicate"
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketed_dedup_equals_the_sequential_pass(seed):
    """Chains of near duplicates (A ~ B ~ C with A !~ C), exact copies of near duplicates, documents without a
    signature: the decisions from bucketed runs and duplicate groups equal the one-process pass, document by
    document."""
    rng = np.random.default_rng(seed)
    cfg = DedupConfig(threshold=0.6, num_perm=32)
    perms = permutations(cfg.num_perm)
    texts = []
    for _ in range(40):
        doc = varied_doc(rng)
        texts.append(doc)
        chain = doc
        for _ in range(int(rng.integers(0, 4))):  # a drifting chain of edits
            chain = edit(rng, edit(rng, chain))
            texts.append(chain)
    texts += [texts[int(i)] for i in rng.integers(len(texts), size=15)]  # exact copies anywhere
    texts += ["짧은 글", "짧은 글"]
    order = rng.permutation(len(texts))
    texts = [texts[i] for i in order]
    keys = [exact_key(t) for t in texts]
    sigs = [signature(t, cfg, perms) if len(t) >= 50 else None for t in texts]
    want = sequential_dedup(sigs, keys, cfg)
    assert want.count("near_duplicate") >= 10 and want.count("exact_duplicate") >= 15
    for files in (1, 3, 7):
        assert bucketed_dedup(sigs, keys, cfg, files) == want


def test_resolve_near_follows_chains():
    """a~b and b~c but not a~c: b is dropped (a is kept), so c is kept; d~a is dropped."""
    groups = np.array([0, 0, 1, 1, 2, 2])
    members = np.array([1, 2, 2, 3, 1, 4], dtype=np.uint64)  # ordinals: a=1, b=2, c=3, d=4
    assert resolve_near(groups, members).tolist() == [2, 4]


# ---- end to end ----


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


@pytest.fixture()
def planted_dups(tmp_path) -> DataConfig:
    """Two sources, five files, exact and near duplicates planted within files, across files and across sources."""
    rng = np.random.default_rng(7)
    originals = [varied_doc(rng) for _ in range(60)]
    d = tmp_path / "in"
    (d / "news").mkdir(parents=True)
    (d / "blog").mkdir()
    files = {
        d / "news" / "a.jsonl": originals[:20] + [originals[3], edit(rng, originals[5])],
        d / "news" / "b.jsonl": originals[20:40] + [originals[10], edit(rng, originals[12]), "짧다", "짧다"],
        d / "news" / "c.jsonl": [edit(rng, originals[25]), originals[0]],
        d / "blog" / "x.jsonl": originals[40:] + [originals[1], edit(rng, originals[30]), edit(rng, originals[45])],
        d / "blog" / "y.jsonl": [originals[41], edit(rng, edit(rng, originals[50])), originals[2].upper()],
    }
    for path, texts in files.items():
        write_jsonl(path, texts)
    return DataConfig(
        name="planted",
        sources={
            "news": SourceConfig(paths=[str(d / "news" / "*.jsonl")], license="CC0-1.0"),
            "blog": SourceConfig(paths=[str(d / "blog" / "*.jsonl")], license="CC0-1.0"),
        },
        allowed_licenses=["CC0-1.0"],
        val_fraction=0.0,
        dedup=DedupConfig(threshold=0.7, min_chars=100),
        write_text=True,
        shard_tokens=3000,
        num_workers=2,
    )


def reference_kept(data: DataConfig) -> tuple[list[str], dict[str, int]]:
    """Kept document ids by the one-process sequential pass (Deduplicator, as before this change)."""
    ref = Deduplicator(data.dedup)
    perms = permutations(data.dedup.num_perm)
    kept, reasons = [], {}
    for name, src in data.sources.items():
        for fi, path in enumerate(resolve_files(name, src)):
            for doc in iter_file_docs(name, src, fi, path):
                assert isinstance(doc, Document)
                text = clean_text(doc.text)
                if quality_reason(text, data.source_filters(name), src.language):
                    continue
                text = scrub(text)
                sig = signature(text, data.dedup, perms) if len(text) >= data.dedup.min_chars else None
                reason = ref.check(exact_key(text), sig)
                reasons[reason] = reasons.get(reason, 0) + 1
                if reason is None:
                    kept.append(doc.doc_id)
    return kept, reasons


def kept_ids(out: Path, data: DataConfig) -> list[str]:
    ids = []
    for name in data.sources:
        ids += [json.loads(line)["id"] for line in (out / "text" / f"{name}.jsonl").read_text().splitlines()]
    return ids


def test_planted_duplicates_removed_as_by_the_sequential_pass(planted_dups, tiny_tokenizer, tmp_path):
    tok = Tokenizer.from_dir(tiny_tokenizer)
    m = prepare(planted_dups, tok, "tok", tmp_path / "out", log=quiet)
    want, reasons = reference_kept(planted_dups)
    assert reasons["exact_duplicate"] >= 6 and reasons["near_duplicate"] >= 5
    assert kept_ids(tmp_path / "out", planted_dups) == want
    got = {r: sum(s["rejected"].get(r, 0) for s in m["sources"].values()) for r in reasons if r}
    assert got == {r: n for r, n in reasons.items() if r}
    for s in m["sources"].values():
        assert s["docs_in"] == s["docs_kept"] + sum(s["rejected"].values())


def test_many_reducers_give_the_same_bytes(planted_dups, tiny_tokenizer, tmp_path, monkeypatch):
    """Reducer bucket ranges sized by RECORDS_PER_REDUCER (which bounds a reducer's memory) change no decision."""
    import data_pipeline.global_pass as gp

    tok = Tokenizer.from_dir(tiny_tokenizer)
    prepare(planted_dups, tok, "tok", tmp_path / "one", log=quiet)
    monkeypatch.setattr(gp, "RECORDS_PER_REDUCER", 16)
    assert len(gp.reducer_ranges(300)) == 19
    prepare(planted_dups, tok, "tok", tmp_path / "many", log=quiet)
    assert output_hashes(tmp_path / "many") == output_hashes(tmp_path / "one")
    assert kept_ids(tmp_path / "many", planted_dups) == kept_ids(tmp_path / "one", planted_dups)


def output_hashes(out: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.bin"))} | {
        MANIFEST: hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest()
    }


def run_prepare(tok: Path, out: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "data_pipeline.prepare", f"tokenizer.path={tok}", f"out={out}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})


SMALL = ["data.max_docs_per_source=120", "data.shard_tokens=5000"]


def test_killed_worker_then_relaunch_reuses_finished_work(tiny_tokenizer, tmp_path):
    """The process is killed in the middle of the plan stage (one worker, so the job itself dies): no manifest;
    the same command again finishes, reusing every per-file result, with the bytes of an uninterrupted run."""
    ref = tmp_path / "ref"
    assert run_prepare(tiny_tokenizer, ref, *SMALL, "data.num_workers=1").returncode == 0
    out = tmp_path / "out"
    killed = run_prepare(tiny_tokenizer, out, *SMALL, "data.num_workers=1", env={"HANGANG_PREPARE_KILL": "plan:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / MANIFEST).exists() and (out / "work").is_dir()
    again = run_prepare(tiny_tokenizer, out, *SMALL, "data.num_workers=1", env={"HANGANG_PREPARE_KILL": "plan:2"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[prepare] read " not in again.stderr  # no input file read twice
    assert output_hashes(out) == output_hashes(ref)


def test_killed_pool_worker_is_retried(tiny_tokenizer, tmp_path):
    """A pool worker killed while writing a shard: the local engine retries the unfinished tasks."""
    ref = tmp_path / "ref"
    assert run_prepare(tiny_tokenizer, ref, *SMALL, "data.num_workers=1").returncode == 0
    out = tmp_path / "out"
    env = {"HANGANG_PREPARE_KILL": "shards:train_00001.bin"}
    run = run_prepare(tiny_tokenizer, out, *SMALL, "data.num_workers=2", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "died; retrying" in run.stderr and (out / ".killed-shards-train_00001.bin.marker").exists()
    assert output_hashes(out) == output_hashes(ref)


def test_default_filters_reject_repetition_and_non_string_text(tiny_tokenizer, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    lines = [{"text": "가" * 3_000_000}, {"text": 12345}, {"text": ["a"]}, {"text": varied_doc(rng)}]
    (d / "a.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    data = DataConfig(
        sources={"s": SourceConfig(paths=[str(d / "a.jsonl")], license="CC0-1.0")},
        allowed_licenses=["CC0-1.0"],
        num_workers=1,
    )
    assert data.filters == FilterConfig()  # a plain data config: the defaults
    m = prepare(data, Tokenizer.from_dir(tiny_tokenizer), "tok", tmp_path / "out", log=quiet)
    s = m["sources"]["s"]
    assert s["rejected"] == {"word_length": 1, "text_not_string": 2} and s["docs_kept"] == 1


# ---- Ray ----


def _ray_env():
    pytest.importorskip("ray")
    return {"RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.slow
def test_ray_output_equals_local_for_1_2_4_workers(tiny_tokenizer, tmp_path):
    env = _ray_env()
    ref = tmp_path / "local"
    assert run_prepare(tiny_tokenizer, ref, *SMALL, "data.num_workers=2").returncode == 0
    want = output_hashes(ref)
    assert len(want) > 4
    for workers in (1, 2, 4):
        out = tmp_path / f"ray{workers}"
        run = run_prepare(tiny_tokenizer, out, *SMALL, "data.engine=ray", f"data.num_workers={workers}", env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert output_hashes(out) == want, workers


@pytest.mark.slow
def test_ray_retries_a_killed_worker(tiny_tokenizer, tmp_path):
    env = {**_ray_env(), "HANGANG_PREPARE_KILL": "dedup:0"}
    ref = tmp_path / "ref"
    assert run_prepare(tiny_tokenizer, ref, *SMALL, "data.num_workers=1").returncode == 0
    out = tmp_path / "out"
    run = run_prepare(tiny_tokenizer, out, *SMALL, "data.engine=ray", "data.num_workers=2", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / ".killed-dedup-0.marker").exists()
    assert output_hashes(out) == output_hashes(ref)


@pytest.mark.slow
def test_two_node_ray_cluster_gives_the_local_bytes(tiny_tokenizer, tmp_path):
    """A head and a second node (`ray start` on 127.0.0.1, own temp dir), prepare with data.ray_address=auto."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    # Ray 2.5x+ secures clusters with a token (~/.ray/auth_token): both `ray start`s must be in token mode.
    env = {**os.environ, **_ray_env(), "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "token"}
    ray = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    head = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1"]
    head += ["--include-dashboard=false", f"--temp-dir={tmp}", "--disable-usage-stats"]
    worker = [ray, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1"]
    try:
        _ray_start(head, env, tmp)
        _ray_start(worker, env, None)
        cluster_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        count = "import ray; ray.init(address='auto'); print(sum(n['Alive'] for n in ray.nodes()))"
        nodes = subprocess.run([sys.executable, "-c", count], env=cluster_env, capture_output=True, text=True)
        assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]
        ref = tmp_path / "local"
        assert run_prepare(tiny_tokenizer, ref, *SMALL).returncode == 0
        out = tmp_path / "cluster"
        run = run_prepare(tiny_tokenizer, out, *SMALL, "data.engine=ray", "data.ray_address=auto", env=cluster_env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert output_hashes(out) == output_hashes(ref)
    finally:
        stop_ray_started_in(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_start(cmd: list[str], env: dict, tmp: str | None) -> None:
    """`ray start`, retried: on an overloaded machine its processes can miss Ray's startup deadlines."""
    for _ in range(3):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            return
        if tmp is not None:
            stop_ray_started_in(tmp)
    raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def stop_ray_started_in(tmp: str) -> None:
    """Kill only this test's Ray processes (those naming its temp dir, and their children): `ray stop` would stop
    every Ray instance of the machine."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid not in me and any(tmp in part for part in p.info["cmdline"] or []):
            mine.append(p)
    procs = {q.pid: q for p in mine for q in [p, *p.children(recursive=True)]}
    for p in procs.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs.values()), timeout=30)


def test_fsspec_inputs_give_the_local_bytes(planted_dups, tiny_tokenizer, tmp_path):
    """Sources given as fsspec URLs (memory:// as a stand-in for s3:// or hf://, and file://) are streamed through
    fsspec and give the same output as the local paths."""
    import fsspec

    tok = Tokenizer.from_dir(tiny_tokenizer)
    planted_dups.write_text = False
    prepare(planted_dups, tok, "tok", tmp_path / "local", log=quiet)
    mem = fsspec.filesystem("memory")
    for name, src in planted_dups.sources.items():
        for path in resolve_files(name, src):
            mem.pipe(f"/i16/{name}/{Path(path).name}", Path(path).read_bytes())
    remote = DataConfig(**{**planted_dups.__dict__})
    remote.sources = {
        "news": SourceConfig(paths=["memory:///i16/news/*.jsonl"], license="CC0-1.0"),
        "blog": SourceConfig(paths=[f"file://{planted_dups.sources['blog'].paths[0]}"], license="CC0-1.0"),
    }
    m = prepare(remote, tok, "tok", tmp_path / "remote", log=quiet)
    assert m["sources"]["news"]["files"][0]["path"].startswith("memory://")
    local, far = output_hashes(tmp_path / "local"), output_hashes(tmp_path / "remote")
    assert {k: v for k, v in far.items() if k != MANIFEST} == {k: v for k, v in local.items() if k != MANIFEST}


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_reading_streams_whatever_the_file_size(tmp_path, scheme):
    """Reading a 9 MB file (locally or through fsspec) holds a few rows at a time, not the file."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    write_jsonl(path, [f"{i} " + "한강 " * 150 for i in range(10_000)])
    assert path.stat().st_size > 8e6
    src = SourceConfig(license="MIT")
    tracemalloc.start()
    n = sum(1 for _ in iter_file_docs("s", src, 0, f"{scheme}{path}"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 10_000 and peak < 2e6, peak
