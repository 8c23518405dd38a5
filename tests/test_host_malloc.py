"""host_malloc: when it re-executes, and that its glibc settings stop repeated page faults."""
import os
import subprocess
import sys
import textwrap

import pytest

from superclip_jax import host_malloc

glibc_linux = pytest.mark.skipif(not host_malloc.supported(), reason="glibc tunables")


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_malloc.OPT_IN, host_malloc._DONE)}
  env.update(extra)
  return env


@glibc_linux
def test_wanted_only_on_request_and_never_over_user_tunables():
  assert not host_malloc.wanted(_clean_env())  # opt-in
  assert not host_malloc.wanted(_clean_env(**{host_malloc.OPT_IN: "system"}))
  tuned = _clean_env(**{host_malloc.OPT_IN: "tuned"})
  assert host_malloc.wanted(tuned)
  assert not host_malloc.wanted(host_malloc.environment(tuned))  # no second re-exec
  with pytest.raises(ValueError, match="GLIBC_TUNABLES already sets glibc.malloc"):
    host_malloc.wanted({**tuned, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  with pytest.raises(ValueError, match="use 'tuned'"):
    host_malloc.wanted(_clean_env(**{host_malloc.OPT_IN: "tcmalloc"}))
  # Other (non-malloc) tunables the user set are kept, ours appended.
  env = host_malloc.environment({**tuned, "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"})
  assert env["GLIBC_TUNABLES"] == "glibc.rtld.optional_static_tls=512:" + host_malloc.TUNABLES


_REEXEC = textwrap.dedent("""
    import os, sys
    print("start", flush=True)
    from superclip_jax import host_malloc
    host_malloc.reexec()
    print(host_malloc.active(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
    """)


def _run(script, *args, **env):
  return subprocess.run([sys.executable, "-c", script, *args], env=_clean_env(**env),
                        capture_output=True, text=True)


@glibc_linux
def test_reexec_restarts_once_with_the_same_command_line():
  out = _run(_REEXEC, "a", "--b=1", **{host_malloc.OPT_IN: "tuned"})
  assert out.stdout.splitlines() == ["start", "start",
                                     f"True ['a', '--b=1'] {host_malloc.TUNABLES}"]
  out = _run(_REEXEC)
  assert out.stdout.splitlines() == ["start", "False [] None"]
  out = _run(_REEXEC, **{host_malloc.OPT_IN: "fast"})
  assert out.returncode != 0 and "SUPERCLIP_JAX_MALLOC='fast': use 'tuned'" in out.stderr


_FAULTS = textwrap.dedent("""
    import ctypes, os, resource
    from superclip_jax import host_malloc
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    faults = []
    for _ in range(4):  # a step's temporaries: 256 MiB allocated, touched, freed
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      p = libc.malloc(256 << 20)
      libc.memset(p, 1, 256 << 20)
      libc.free(p)
      if os.environ.get("RELEASE"):
        host_malloc.release()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
    """)


@glibc_linux
def test_tunables_stop_refaulting_large_temporaries():
  def faults(env):
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                         text=True, check=True).stdout
    return [int(x) for x in out.split()]

  pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  system = faults(_clean_env())
  tuned = faults(host_malloc.environment(_clean_env()))
  released = faults(host_malloc.environment(_clean_env(RELEASE="1")))
  # glibc's default mmaps and munmaps the block: every step faults in every page again
  # (fewer if the kernel hands out transparent huge pages).
  assert all(f > pages // 1024 for f in system), system
  assert tuned[0] > pages // 1024, tuned  # the first touch faults either way
  assert all(f < pages // 1024 for f in tuned[1:]), tuned  # then the heap block is reused
  # release() after each free hands the pages back: they fault in again.
  assert all(f > pages // 1024 for f in released), released
