"""The code sandbox: correct/partial solutions, and each limit stopping what it should."""
import os
import socket
import time

import pytest

from r1jax.rewards import code_reward, extract_program, make_code_reward, run_sandboxed

SQ = "def sq(x):\n    return x * x\n"
TESTS = ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == 1"]


def r1(program: str) -> str:
    return f"<think>easy</think><answer>\n```python\n{program}```\n</answer>"


def run(program, tests=TESTS, **kw):
    t = time.perf_counter()
    result = run_sandboxed(program, tests, **{"timeout_s": 1.0, "memory_mb": 512, **kw})
    return result, time.perf_counter() - t


def test_correct_scores_one_and_partial_scores_fraction():
    ex = {"task": "code", "tests": TESTS}
    partial = "def sq(x):\n    return x * x if x > 0 else 0\n"
    out = code_reward([r1(SQ), r1(partial), r1("def sq(x): return 0\n"), "no answer"], [ex] * 4)
    assert out.tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.0])


def test_extract_program():
    assert extract_program(r1(SQ)) == SQ
    assert extract_program("<think>t</think><answer>print(1)</answer>") == "print(1)"
    two = "<answer>```python\nx = 1\n```\nthen\n```py\nx = 2\n```</answer>"
    assert extract_program(two) == "x = 2\n"
    assert extract_program("```python\nx = 1\n```") is None  # outside <answer>


def test_stdin_stdout_tests():
    prog = "n = int(input())\nprint(n * n)\n"
    tests = [{"input": "3\n", "output": "9\n"}, {"input": "4", "output": "16"},
             {"input": "5", "output": "24"}]
    result, _ = run(prog, tests)
    assert result.passed == (True, True, False)
    exits = "import sys\nprint(int(input()) * 2)\nsys.exit(0)\n"
    assert run(exits, [{"input": "2", "output": "4"}])[0].score == 1.0


def test_infinite_loop_is_stopped_by_the_per_test_timer():
    result, elapsed = run("def sq(x):\n    while True:\n        x += 1\n")
    assert result.score == 0.0 and elapsed < 3 * 1.0 + 2   # three tests, 1 s each
    result, elapsed = run("while True:\n    pass\n" + SQ)  # at top level: one timer
    assert result.score == 0.0 and elapsed < 1.0 + 2


def test_loop_that_ignores_the_timer_is_killed_at_the_wall_limit():
    prog = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    result, elapsed = run(prog, TESTS[:1], wall_s=2.0)
    assert result.score == 0.0 and result.timed_out and 2.0 <= elapsed < 4.0


def test_large_allocation_fails_within_the_memory_limit():
    for alloc in ["x = bytearray(8 * 1024 ** 3)", "x = [0] * 10 ** 9", "x = 'a' * 2 ** 31"]:
        result, elapsed = run(alloc + "\n" + SQ)
        assert result.score == 0.0 and elapsed < 3, alloc
    assert run("x = bytearray(64 * 1024 ** 2)\n" + SQ)[0].score == 1.0  # within the limit


@pytest.mark.parametrize("isolate_network", [None, False])
def test_network_connection_is_refused(isolate_network):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    prog = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + SQ)
    try:
        result, elapsed = run(prog, isolate_network=isolate_network)
        assert result.score == 0.0 and elapsed < 3
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()
    assert run("import socket\n" + SQ, isolate_network=isolate_network)[0].score == 1.0


def test_writes_outside_the_temp_dir_are_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    keep = tmp_path / "keep"
    keep.mkdir()
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.chdir('/')\nopen({str(target)[1:]!r}, 'a')",
        f"import shutil\nshutil.rmtree({str(keep)!r})",
        f"import os\nos.symlink({str(target)!r}, 'link')",
        f"import os\nopen('x', 'w').close()\nos.rename('x', {str(target)!r})",
        f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])",
        f"import os\nos.system('touch {target}')",
        "import os\nos.fork()",
        "import ctypes\nctypes.CDLL(None).system(b'true')",
    ]
    for attempt in attempts:
        result, elapsed = run(attempt + "\n" + SQ)
        assert result.score == 0.0 and elapsed < 3, attempt
        assert not target.exists() and keep.exists(), attempt
    inside = "open('scratch.txt', 'w').write('ok')\nimport os, tempfile\n" \
             "assert os.environ['HOME'] == os.getcwd()\ntempfile.NamedTemporaryFile()\n"
    assert run(inside + SQ)[0].score == 1.0


def test_sandbox_dir_is_removed_and_parallel_batches_work():
    before = {d for d in os.listdir(os.environ.get("TMPDIR", "/tmp")) if "r1jax-sandbox" in d}
    reward = make_code_reward(timeout_s=1.0, max_parallel=4)
    ex = {"task": "code", "tests": TESTS}
    t = time.perf_counter()
    out = reward([r1(SQ)] * 16, [ex] * 16)
    elapsed = time.perf_counter() - t
    print(f"code sandbox: 16 correct solutions in {elapsed:.2f}s")
    assert out.tolist() == [1.0] * 16
    after = {d for d in os.listdir(os.environ.get("TMPDIR", "/tmp")) if "r1jax-sandbox" in d}
    assert after <= before


def test_the_trainer_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("R1JAX_TEST_SECRET", "hunter2")
    # The program's own environment is a fresh minimal one, and the parent's cannot be read through /proc.
    own = "import os\nassert not any('hunter2' in v for v in os.environ.values())\n"
    assert run(own + SQ)[0].score == 1.0
    # Reading the parent's environment through /proc is refused or shows no secret: either way LEAKED is False.
    probe = ("import os\ntry:\n    LEAKED = 'hunter2' in open(f'/proc/{os.getppid()}/environ').read()\n"
             "except Exception:\n    LEAKED = False\n")
    assert run(probe + SQ, ["assert not LEAKED", *TESTS])[0].score == 1.0


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_fork_loops_and_endless_sleeps_leave_no_process_behind():
    marker = "r1jax-leftover-probe"
    programs = [
        "import os\nwhile True:\n    os.fork()\n",
        f"import subprocess\nsubprocess.Popen(['sleep', '1000', '{marker}'])\n",
        f"import os\nos.execv('/bin/sleep', ['sleep', '1000', '{marker}'])\n",
        "import time\ntime.sleep(10 ** 6)\n",
        "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\ntime.sleep(10 ** 6)\n",
    ]
    for program in programs:
        result, elapsed = run(program + SQ, TESTS[:1], wall_s=2.0)
        assert result.score == 0.0 and elapsed < 4.0, program
    time.sleep(0.5)
    assert _processes_with(marker) == []
