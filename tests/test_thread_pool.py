"""onnxruntime's shared intra-op thread pool (`thread_pool="shared"`, the verbs' default).

The pool is process-wide and once made cannot be undone, so everything that makes one runs in a process of
its own; the suite's own process keeps per-session pools (conftest sets ANYTIME_THREAD_POOL=session).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from test_runtime_profile import synthetic_profile

import anytime
from anytime.errors import ConfigError, ProfileError, ProfileMismatchWarning
from anytime.formats.profile import LatencyProfile

pytestmark = pytest.mark.runtime  # torch-free: .ci/run also runs these without torch

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env_pool: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ANYTIME_THREAD_POOL", None)
    if env_pool is not None:
        env["ANYTIME_THREAD_POOL"] = env_pool
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_shared_pool_gives_the_same_answers_and_then_holds_the_process(pattern_bundle):
    done = run_python(
        f"""
        import json, logging
        import numpy as np
        import anytime
        from anytime.runtime import threadpool

        logging.basicConfig(level=logging.WARNING)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((40, 1, 16, 16)).astype(np.float32)
        per_session = anytime.load({str(pattern_bundle)!r}, device="cpu", threads=2)  # the API default
        shared = anytime.load({str(pattern_bundle)!r}, device="cpu", threads=2, thread_pool="shared")
        thresholds = np.array([0.9, 0.8, 0.7, 0.0], dtype=np.float32)
        a = per_session.executor.run_early_exit(x, thresholds)
        b = shared.executor.run_early_exit(x, thresholds)
        later = anytime.load({str(pattern_bundle)!r}, device="cpu", threads=1, thread_pool="session")
        c = later.executor.run_early_exit(x, thresholds)
        # IO binding's own gather sessions must run on the shared pool too (onnxruntime refuses others).
        bound = anytime.load({str(pattern_bundle)!r}, device="cpu", threads=2, thread_pool="shared", io_binding=True)
        d = bound.executor.run_early_exit(x, thresholds)
        print(json.dumps({{
            "kinds": [m.executor.thread_pool for m in (per_session, shared, later)],
            "threads": [m.executor.threads for m in (per_session, shared, later)],
            "per_session_threads": [
                s.get_session_options().use_per_session_threads for s in shared.executor.sessions + later.executor.sessions
            ],
            "same": all(np.array_equal(p, q) for p, q in zip(a[:3], b[:3]))
            and all(np.array_equal(p, q) for p, q in zip(a[:3], c[:3]))
            and all(np.array_equal(p, q) for p, q in zip(a[:3], d[:3])),
            "logits_close": bool(np.allclose(per_session.executor.run_all(x), shared.executor.run_all(x), atol=1e-5)),
            "pool": threadpool.shared_pool(),
        }}))
        """
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kinds"] == ["session", "shared", "shared"]
    # The later model asked for a 1-thread session pool and got the process's 2-thread pool, said so.
    assert result["threads"] == [2, 2, 2]
    assert result["per_session_threads"] == [False] * 8
    assert result["same"] and result["logits_close"]
    assert result["pool"] == [True, 2]
    assert "already has a shared onnxruntime thread pool of 2 threads" in done.stderr
    assert "asked for: a session pool of 1 threads" in done.stderr


def test_a_shared_pool_made_by_another_thread_during_a_load_does_not_slip_under_its_sessions(pattern_bundle):
    """A load decided on per-session pools, then made its sessions; a shared pool made in between by another
    thread's load put those sessions on it while the executor still said "session" with its own thread count
    (what a profile of it records). Deciding and making the sessions now exclude making the pool."""
    done = run_python(
        f"""
        import json, threading
        import anytime
        from anytime.runtime import engine, threadpool

        made = threading.Event()

        def other_load():
            threadpool.resolve_thread_pool("shared", 1)  # another thread's anytime.load(thread_pool="shared")
            made.set()

        real_create = engine.create_session
        other = threading.Thread(target=other_load)

        def create_session(*args, **kwargs):
            if not other.is_alive() and not made.is_set():
                other.start()
                made.wait(2)  # it gets the lock at once unless this load holds it
            return real_create(*args, **kwargs)

        engine.create_session = create_session
        model = anytime.load({str(pattern_bundle)!r}, device="cpu", threads=2)
        other.join(30)
        print(json.dumps({{
            "kind": model.executor.thread_pool,
            "threads": model.executor.threads,
            "per_session_threads": [s.get_session_options().use_per_session_threads for s in model.executor.sessions],
            "pool": threadpool.shared_pool(),
        }}))
        """
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pool"] == [True, 1]  # the other thread made it, after this load
    assert (result["kind"], result["threads"]) == ("session", 2)
    assert result["per_session_threads"] == [True] * 4


def test_a_shared_pool_made_outside_anytime_is_refused_with_the_fix(pattern_bundle):
    done = run_python(
        f"""
        from onnxruntime.capi import _pybind_state
        import anytime
        from anytime.errors import ConfigError

        _pybind_state.set_global_thread_pool_sizes(1, 1)
        try:
            anytime.load({str(pattern_bundle)!r}, device="cpu", thread_pool="shared")
        except ConfigError as exc:
            print("refused:", exc)
        """
    )
    assert "refused: onnxruntime's shared thread pool was already made outside anytime" in done.stdout
    assert "thread_pool='session'" in done.stdout


@pytest.mark.parametrize(
    "env_pool, option, expected",
    [(None, [], "shared"), (None, ["--thread-pool", "session"], "session"), ("session", [], "session")],
)
def test_profile_verb_defaults_to_the_shared_pool_and_records_it(pattern_bundle, tmp_path, env_pool, option, expected):
    out = tmp_path / "profile.json"
    run_python(
        f"""
        from anytime.cli import main
        try:
            main(["profile", {str(pattern_bundle)!r}, "--device", "cpu", "--threads", "2", "--repeats", "1",
                  "--batch-size", "8", "-o", {str(out)!r}, *{option!r}])
        except SystemExit as exc:
            assert not exc.code, exc.code
        """,
        env_pool=env_pool,
    )
    profile = LatencyProfile.load(out)
    assert profile.thread_pool == expected
    assert profile.threads == 2


def test_unknown_thread_pool_is_refused(pattern_bundle):
    with pytest.raises(ConfigError, match="thread_pool 'global' is unknown; use one of shared, session"):
        anytime.load(pattern_bundle, device="cpu", thread_pool="global")


def test_profile_of_another_thread_pool_warns_unless_one_thread(pattern_bundle):
    shared = dataclasses.replace(synthetic_profile(pattern_bundle, threads=2), thread_pool="shared")
    with pytest.warns(ProfileMismatchWarning, match="a shared intra-op thread pool when measured, a session one now"):
        anytime.load(pattern_bundle, device="cpu", threads=2, profile=shared)
    one = dataclasses.replace(synthetic_profile(pattern_bundle, threads=1), thread_pool="shared")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one thread: no pool workers, nothing to differ
        anytime.load(pattern_bundle, device="cpu", threads=1, profile=one)


def test_profile_file_carries_the_pool_and_older_files_read_as_per_session(pattern_bundle, tmp_path):
    profile = dataclasses.replace(synthetic_profile(pattern_bundle, threads=2), thread_pool="shared")
    path = profile.save(tmp_path / "p.json")
    assert LatencyProfile.load(path).thread_pool == "shared"
    data = json.loads(path.read_text())
    del data["thread_pool"]
    path.write_text(json.dumps(data))
    assert LatencyProfile.load(path).thread_pool == "session"
    data["thread_pool"] = "global"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="thread_pool is 'global', expected one of shared, session"):
        LatencyProfile.load(path)
