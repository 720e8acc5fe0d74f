"""The sandbox under attack: every attempt is stopped, reported as a failed result, and the
test process (the parent) carries on. Also the code and maths verifiers built on it."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from stillhouse.verify.code import CodeVerifier, build_program, extract_code, humaneval_problems
from stillhouse.verify.math import MathVerifier
from stillhouse.verify.sandbox import Limits, run_python

FAST = Limits(wall_s=3.0, cpu_s=2, memory_mb=512, processes=16)  # for programs that must be stopped
# for programs that must finish (or fail in their own way): a loaded machine may take seconds to
# start Python in the sandbox, which must not turn into a timeout
ROOMY = Limits(wall_s=300.0, cpu_s=120, memory_mb=512, processes=16)


def _no_process_with(marker: str) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return marker not in out


def test_clean_program_runs_and_reads_stdin():
    r = run_python("import sys; print(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3", limits=ROOMY)
    assert r.passed and r.stdout.strip() == "6" and r.returncode == 0


def _no_program_left(within: float = 60.0) -> bool:
    """Whether every sandboxed process is gone, polled (the kernel reaps them in its own time)."""
    give_up = time.monotonic() + within
    while subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.count("main.py"):
        if time.monotonic() > give_up:
            return False
        time.sleep(0.05)
    return True


def test_failing_program_is_an_error_not_an_exception():
    r = run_python("raise ValueError('boom')", limits=ROOMY)
    assert r.status == "error" and "ValueError: boom" in r.stderr


def test_infinite_loop_is_stopped():
    t = time.monotonic()
    r = run_python("while True:\n    pass", limits=FAST)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t < FAST.wall_s + 60  # stopped (generous: a loaded machine is slow to reap)


def test_sleeping_program_hits_the_wall_clock():
    r = run_python("import time\ntime.sleep(60)", limits=Limits(wall_s=1.0, cpu_s=5))
    assert r.status == "timeout" and 0.9 < r.wall_s < 30  # stopped long before its 60 s sleep ended


def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    marker = "forkbomb_marker_5821"
    code = f"import os, time\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
    r = run_python(code, limits=FAST)
    assert not r.passed
    # Every process it started died with it: nothing runs main.py any more.
    assert _no_program_left()


def test_escaped_session_child_dies_with_the_program():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nprint('bye')"
    r = run_python(code, limits=ROOMY)
    assert r.passed and r.stdout.strip() == "bye"
    assert _no_program_left()


def test_memory_bomb_is_stopped():
    r = run_python("x = bytearray(8 * 1024 ** 3)\nprint('allocated')", limits=ROOMY)
    assert r.status == "memory" and "allocated" not in r.stdout


def test_output_flood_is_capped():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 4096)", limits=Limits(wall_s=5, output_bytes=100_000))
    assert r.status == "output_limit" and len(r.stdout) <= 100_000


def test_no_network_not_even_the_hosts_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    r = run_python(code, limits=ROOMY)  # ROOMY: the program must get to try, however slow it starts
    server.setblocking(False)  # a connection the program made waits in the backlog, accepted or not
    try:
        server.accept()[0].close()
        leaked = True
    except BlockingIOError:
        leaked = False
    server.close()
    assert not r.passed and "connected" not in r.stdout and not leaked
    assert "Error" in r.stderr  # it tried and was refused (not stopped before it could try)
    r2 = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", limits=ROOMY)
    assert not r2.passed and r2.status == "error"


def test_users_files_are_invisible_and_unwritable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-value")
    target = tmp_path / "written.txt"
    code = (
        "import os\n"
        f"for p in [{str(secret)!r}, os.path.expanduser('~/.ssh/id_rsa'), '/root/.ssh/id_rsa', '/etc/passwd']:\n"
        "    try:\n        print(open(p).read())\n    except OSError as e:\n        print('denied', type(e).__name__)\n"
        f"for p in [{str(target)!r}, '/usr/evil.txt']:\n"
        "    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n    except OSError as e:\n        print('denied', type(e).__name__)\n"
        "print(sorted(os.listdir('/')))\n"
    )
    r = run_python(code, limits=FAST)
    assert r.passed, r.stderr
    assert "s3cr3t-value" not in r.stdout
    assert r.stdout.count("denied") == 6  # four reads, two writes
    assert not target.exists()
    assert not os.path.exists("/usr/evil.txt")
    assert "home" not in r.stdout and "work" not in r.stdout


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("STILLHOUSE_TEST_SECRET", "tok-123")
    r = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('STILLHOUSE_TEST_SECRET'))", limits=FAST)
    assert r.passed and "tok-123" not in r.stdout and "STILLHOUSE_TEST_SECRET" not in r.stdout


def test_exit_code_125_from_the_program_is_just_an_error():
    # 125 is the launcher's own set-up failure code; the program cannot fake a set-up failure.
    r = run_python("import sys\nsys.exit(125)", limits=FAST)
    assert r.status == "error" and r.returncode == 125


def test_extract_code_prefers_the_longest_fenced_block():
    text = "Here:\n```python\ndef f(x):\n    return x + 1\n```\nExample:\n```python\nf(1)\n```"
    assert extract_code(text).startswith("def f(x):")
    assert extract_code("    return x") == "    return x"
    assert extract_code("```python\ndef g():\n    return 2\n") == "def g():\n    return 2\n"


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval_problems(limit=4)
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(4)]
    verify = CodeVerifier(FAST)
    for p in problems:
        assert verify(p, p["canonical_solution"]).passed
    wrong = verify(problems[0], "    return not True\n")
    assert not wrong.passed and wrong.detail.startswith("error")
    hang = verify(problems[0], "    while True:\n        pass\n")
    assert not hang.passed and hang.detail.startswith("timeout")


def test_full_function_in_a_fence_replaces_the_body():
    p = humaneval_problems(limit=1)[0]
    answer = (
        "Sure!\n```python\ndef has_close_elements(numbers, threshold):\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```"
    )
    assert CodeVerifier(FAST)(p, answer).passed
    assert "check(has_close_elements)" in build_program(p, answer)


def test_assert_style_tests_without_entry_point():
    record = {"test": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    assert CodeVerifier(FAST)(record, "def add(a, b):\n    return a + b").passed
    assert not CodeVerifier(FAST)(record, "def add(a, b):\n    return a - b").passed


@pytest.mark.parametrize(
    "answer,completion,ok",
    [
        ("42", "So the answer is $42$.", True),
        ("1/2", "which gives 0.5", True),
        ("\\frac{1}{2}", "x = \\boxed{\\frac{2}{4}}", True),
        ("x^2+2x", "\\boxed{x(x+2)}", True),
        ("3", "I think it is 4", False),
        ("3", "no idea", False),
    ],
)
def test_math_verifier(answer, completion, ok):
    assert MathVerifier()({"answer": answer}, completion).passed is ok
