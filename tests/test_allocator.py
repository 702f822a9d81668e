"""The CLI's malloc thresholds: freed blocks are reused instead of faulted in anew; a user's settings win."""

import os
import subprocess
import sys
import textwrap

import pytest

from noduledet import allocator, cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# 20 blocks of 64 MiB (above glibc's largest automatic mmap threshold, 32 MiB) from malloc itself,
# each written through and freed; page faults counted before and after keep_freed_memory().
_SCRIPT = textwrap.dedent("""
    import ctypes, os, resource
    from noduledet.allocator import keep_freed_memory

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            block = libc.malloc(64 << 20)
            ctypes.memset(block, 1, 64 << 20)
            libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults()
    kept = keep_freed_memory()
    print(default, kept, faults(), os.environ.get("MALLOC_MMAP_THRESHOLD_"))
""")


def _run(**env: str) -> list[str]:
    mine = allocator.user_settings(os.environ)
    clean = {k: v for k, v in os.environ.items() if k not in mine}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, kept, after, env = _run()
    assert kept == "True"
    if env != str(allocator.MMAP_THRESHOLDS[0]):
        pytest.skip(f"this glibc caps the mmap threshold below 64 MiB (set {env})")
    assert int(after) * 5 < int(default)  # the first block grows the heap; the other 19 reuse it


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=0"},
                                 {allocator.OPT_OUT: "0"}])
def test_a_users_own_malloc_setting_or_opt_out_wins(env):
    default, kept, after, set_env = _run(**env)
    assert kept == "False"
    assert set_env == "None"
    assert int(after) > 0.5 * int(default)


def test_the_cli_sets_the_thresholds_before_any_work(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))  # replaces conftest's no-op
    assert cli.main(["models", "--variants", "res", "--size", "32", "--repeats", "1"]) == 0
    assert calls == [1]
