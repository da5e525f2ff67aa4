"""Workarounds for the software the predictor runs on: Cog 0.23.1 (coglet), glibc, libgomp, and the log
output of transformers 5.23 and diffusers 0.42.1.

Each says what upstream does, what we do about it, and how to tell when it can go.

The rule: a workaround that changes process-wide state (Python's temp folder, the allocator) or removes
files that are not this process's own takes effect only inside Cog's worker (`in_cog_worker()`), the
long-lived process it is for. A Predictor set up anywhere else (the tests, scripts/cog_predict.py, the
benchmarks) leaves its process as it found it, except for the logging configuration.
"""

from __future__ import annotations

import atexit
import contextvars
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

from errors import UserError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
T = TypeVar("T")


def in_cog_worker() -> bool:
    """True inside coglet's worker subprocess, the process that runs setup() and every prediction."""
    try:
        import coglet
    except ImportError:
        return False
    return bool(coglet.server.active)


# ---------------------------------------------------------------- logging


def configure_logging(level_name: str) -> None:
    """Our loggers at `level_name` (LOG_LEVEL, default INFO); every library at WARNING, or at DEBUG when
    LOG_LEVEL is DEBUG (a quieter LOG_LEVEL, ERROR, quietens them too). No progress bars.

    Workarounds in it:
    - transformers' `convert_slow_tokenizers_checkpoints_to_fast` module calls `set_verbosity_info()` when
      it is imported, which dumps every model config as JSON at INFO from then on. Cog's inspector
      imports it (below, "Cog's inspector"); anything else that imports it would too. So transformers'
      and diffusers' verbosity is set here, after the imports. Can go when
      `python -c "import logging, transformers.convert_slow_tokenizers_checkpoints_to_fast;
      print(logging.getLogger('transformers').level)"` prints 30.
    - diffusers 0.42.1 (`ModelMixin.to`, `fp32_modules = ... or []` then `is not None`) warns "There are
      modules in X that should be kept in float32: []" on every dtype cast, with an empty list, for
      every model `from_pipe` builds. Those warnings (empty list only) are dropped. Can go when diffusers
      checks the list is non-empty (`grep -n "fp32_modules is not None" .../diffusers/models/modeling_utils.py`
      finds nothing).
    - diffusers' Flux pipelines import `transformers.CLIPImageProcessor` and `SiglipImageProcessor`, which
      transformers 5.23 without torchvision resolves to their PIL versions with a warning each ("requires
      torchvision (not installed); falling back to …Pil"). The PIL versions are what we use (safety.py
      names them directly), so those warnings are dropped; hence predict.py imports pipelines inside
      setup(), after this. Can go when diffusers imports the `…Pil` names or the warning is gone.

    Cog's inspector: before setup() Cog (`cog._inspector._find_coders`) runs `inspect.getmembers` on every
    module that predict.py holds as a global. For a lazy package (transformers, diffusers) that imports
    every submodule: 3,300 modules and 11 s on 2 cores, 93 "requires torchvision … falling back" warnings from the
    image processors, and the INFO switch above. So predict.py must never `import transformers` or
    `import diffusers` at module level (import what is needed from them, or import them inside a
    function). tests/test_server.py checks a served setup's logs hold only our lines. Can go when
    `_find_coders` looks only at `cog.coders` modules.
    """
    level = logging.getLevelName(level_name.strip().upper())
    if not isinstance(level, int):
        raise ValueError(f"LOG_LEVEL={level_name!r} is not a log level: use DEBUG, INFO, WARNING or ERROR.")
    libraries = logging.DEBUG if level <= logging.DEBUG else max(level, logging.WARNING)
    logging.basicConfig(level=libraries, format="%(message)s", force=True)
    for name in our_loggers():
        logging.getLogger(name).setLevel(level)

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity(libraries)  # their own loggers, which do not propagate to the root
        library.disable_progress_bar()  # progress bars would flood the prediction logs
    for name, drop in (
        ("diffusers.models.modeling_utils", _empty_fp32_warning),
        ("transformers.utils.import_utils", _torchvision_fallback_warning),
    ):
        if drop not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(drop)


def our_loggers() -> list[str]:
    """The names of the project's own loggers (each is named after its module): its top-level modules
    and packages, and the scripts in its folders that are not packages (scripts/, bench/…)."""
    names = {p.stem for p in ROOT.glob("*.py")}
    for folder in (p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / "__init__.py").is_file():
            names.add(folder.name)  # a package: its modules' loggers are its children
        elif scripts := [p.stem for p in folder.glob("*.py")]:
            names.update([folder.name, *scripts])
    return sorted(names)


def _empty_fp32_warning(record: logging.LogRecord) -> bool:
    return "that should be kept in float32: []" not in record.getMessage()


def _torchvision_fallback_warning(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


# ---------------------------------------------------------------- glibc


# The image's allocator (cog.yaml: system package libtcmalloc-minimal4, LD_PRELOAD; the Makefile's serve).
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
# The server's allocator environment, as cog.yaml's `environment` sets it (tests/test_packaging.py
# holds the two equal; it applies to coglet's server process and its worker alike): tcmalloc preloaded;
# its report of large allocations (the weights) silenced; its per-thread caches capped at 8 MiB in all
# (gperftools' default, 32 MiB, let coglet's server process creep +10 MiB over 1,000 predictions, still
# growing at the end; with 8 MiB it levels off within 250 and the worker is as fast: bench/README.md,
# "Allocator"); and for glibc's malloc, should the preload not happen, 2 arenas.
SERVING_ENVIRONMENT = {
    "LD_PRELOAD": str(TCMALLOC),
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40),
    "TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES": str(8 << 20),
    "MALLOC_ARENA_MAX": "2",
}


def serving_environment(preload: bool = True) -> dict[str, str]:
    """SERVING_ENVIRONMENT for a server started here: the preload and tcmalloc's settings only where
    tcmalloc is installed (and `preload`), as `make serve` does."""
    env = dict(SERVING_ENVIRONMENT)
    if not (preload and TCMALLOC.exists()):
        env = {k: v for k, v in env.items() if k != "LD_PRELOAD" and not k.startswith("TCMALLOC_")}
    return env


class HeapTrim:
    """Keep the worker's memory flat over thousands of predictions, without paying for it per request.

    glibc's malloc keeps memory that Python and torch free, to reuse it: that is what makes a request
    fast, but over hundreds of predictions of varied sizes the kept memory fragments and the worker's
    RSS creeps up (glibc's defaults: 521 → 620 MiB over 1,000 predictions; bench/README.md,
    "Allocator"). `malloc_trim(0)` hands every free page back to the OS. It is called after a
    prediction only when the worker's RSS has grown by more than `slack_bytes` (16 MiB) since the last
    trim, so most requests pay nothing but reading /proc/self/statm (~20 µs); a trim costs a few ms,
    and the next request faults the pages it needs back in. With the serving environment's 2 arenas
    (SERVING_ENVIRONMENT) that keeps RSS flat (426 → 441 MiB, +0 over the last 500); with glibc's
    default arenas alone it does not (439 → 506, +14 over the last 500).

    The image preloads tcmalloc instead (cog.yaml), which is faster and flat by itself; this is for
    a worker on glibc's malloc (`make serve` where Debian's libtcmalloc-minimal4 is not installed).
    It replaces a process-wide `mallopt` (2 arenas, mmap and trim thresholds 1 MiB: flat too, but
    every tensor of 1 MiB or more became its own mmap, page-faulted on every use: +20–30 % per request
    on the tiny CPU pipeline). Only in Cog's worker (`enabled`); with another allocator, or without
    glibc (musl, macOS), it does nothing. Can go when `make soak` keeps RSS flat without it.
    """

    def __init__(self, enabled: bool, slack_bytes: int = 16 << 20):
        libc_name = ctypes.util.find_library("c") if enabled and not other_allocator() else None
        libc = ctypes.CDLL(libc_name) if libc_name else None
        self._malloc_trim = getattr(libc, "malloc_trim", None)
        self.slack_bytes = slack_bytes
        self._level: int | None = None  # RSS right after the last trim
        self.trims = 0

    def __enter__(self) -> HeapTrim:
        return self

    def __exit__(self, *exc) -> None:
        """After a prediction (successful or not): trim if RSS grew past the slack."""
        if self._malloc_trim is None:
            return
        rss = resident_bytes()
        if self._level is not None and rss <= self._level + self.slack_bytes:
            return
        started = time.perf_counter()
        self._malloc_trim(0)
        self._level = resident_bytes()
        self.trims += 1
        logger.debug(
            "returned %d MiB of free heap to the OS in %.1f ms",
            (rss - self._level) >> 20,
            (time.perf_counter() - started) * 1000,
        )


class ModelThread:
    """Every call into the models on one thread of ours, so that PyTorch's CPU work runs at full speed.

    Cog 0.23.1 runs setup() on its worker's main thread and each predict() on one of its runtime's
    threads, a different one from request to request. PyTorch's CPU ops run on OpenMP (libgomp),
    which keeps a team of threads for each thread that calls it; once the process holds more of
    those than it has CPUs, libgomp stops spinning between parallel regions and every op wakes its
    team from sleep (`gomp_throttled_spin_count_var`, libgomp's wait.h). Measured on 2 cores, the
    tiny pipeline at 256² took 65–76 ms in Cog's worker against 42–44 ms in a plain process, as slow
    as one thread (61 ms); run here, 46 ms (bench/README.md, "The fixed tax"). Can go when coglet
    calls predict() from one thread.

    `call(fn, ...)` runs `fn` here in the caller's context (Cog's current prediction: its logs and
    metrics) and returns its result or raises its exception. A cancel: coglet raises
    CancelationException in the thread running predict() (PyThreadState_SetAsyncExc). The caller
    waits in short slices so that it receives it, raises the same exception here the same way, and
    waits for this thread to unwind before raising it, so that no prediction runs beside a
    canceled one.
    """

    POLL_S = 0.05  # how soon a waiting caller receives an exception raised in it

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._ident = self._pool.submit(threading.get_ident).result()

    def is_current(self) -> bool:
        return threading.get_ident() == self._ident

    def call(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        if self.is_current():
            return fn(*args, **kwargs)
        future = self._pool.submit(contextvars.copy_context().run, fn, *args, **kwargs)
        try:
            while True:
                try:
                    return future.result(timeout=self.POLL_S)
                except TimeoutError:
                    continue
        except BaseException as error:
            if not future.done():
                _raise_in_thread(self._ident, type(error))
                while not future.done():
                    try:
                        wait([future])
                    except BaseException:  # noqa: S112  (a second exception while it unwinds: keep waiting)
                        continue
            raise


def _raise_in_thread(ident: int, exception: type[BaseException]) -> None:
    """Raise `exception` in the Python thread `ident` at its next bytecode, as coglet cancels predict()."""
    prototype = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)
    prototype(("PyThreadState_SetAsyncExc", ctypes.pythonapi))(ident, exception)


def other_allocator() -> str | None:
    """ "tcmalloc" / "jemalloc" when that allocator replaces glibc's malloc in this process (LD_PRELOAD)."""
    process = ctypes.CDLL(None)
    for name, symbol in (("tcmalloc", "tc_malloc"), ("jemalloc", "mallctl")):
        if hasattr(process, symbol):
            return name
    return None


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------- Cog's leftovers on disk

# coglet 0.23 makes /tmp/coglet/predictions/<id>/{inputs,outputs} for every prediction, leaves them
# empty (inputs go to TMPDIR) and never removes them: 3 directories, 12 KB on ext4, per prediction.
# Can go when a few predictions on a server leave nothing there.
COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")
STALE_AFTER_S = 10.0
# The folders this project's workers keep in TMPDIR, named after the worker's pid: its input downloads
# (InputDownloads) and each prediction's outputs (images.OutputWriter, `flux-out-<pid>-<random>`).
WORKER_FOLDER = re.compile(r"^flux-(?:inputs|out)-(\d+)(?:-.*)?$")


class InputDownloads:
    """A folder of this worker's own, `TMPDIR/flux-inputs-<pid>`, for the files Cog downloads `image`
    and `mask` URLs into.

    Cog (0.23.1, `cog/types.py`, `URLPath.convert`) downloads a URL input into a
    `tempfile.NamedTemporaryFile` in the default temp folder before the prediction starts and removes it
    afterwards, except when the download fails (a 404, a URL that hangs): then the partial file stays for
    good. So, in Cog's worker, isolate() points Python's `tempfile.tempdir` (process-wide) at this folder,
    and each prediction, as it starts, removes the download files left there by earlier ones (sweep): at
    most the failed downloads since the last prediction remain, never a growing pile. The folder goes
    when the worker exits; those of workers that died without exiting (killed) go at the next setup.
    Can go when a 404 `image` URL on a server with its own TMPDIR leaves no `tmp*` file there
    (tests/test_http_faults.py's "image url 404" then passes without the sweep).
    """

    PREFIX = "flux-inputs-"
    # NamedTemporaryFile's names: "tmp" + 8 characters of this alphabet, then Cog's suffix.
    DOWNLOAD_NAME = re.compile(r"^tmp[a-z0-9_]{8}")

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or tempfile.gettempdir())
        self.folder = self.root / f"{self.PREFIX}{os.getpid()}"
        self.active = False

    def isolate(self) -> Path:
        """Remove the folders dead workers left in the temp folder, create this worker's, make it the
        process's temp folder and have it removed when the process exits."""
        remove_dead_workers_folders(self.root)
        self.folder.mkdir(mode=0o700, exist_ok=True)
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)
        tempfile.tempdir = str(self.folder)
        exit_on_sigterm(self.root)
        self.active = True
        return self.folder

    def check_local(self, **files: Path | None) -> None:
        """Defence in depth for the Cog server reached without the front (Replicate's platform, `make
        serve-cog`): coglet hands any input string that is not a URL to run() as a local path
        (FACTS.md). In Cog's worker a file input must be one Cog downloaded into this worker's folder;
        anything else is refused with one message, whether or not it exists (never opened, never
        looked up). Outside Cog's worker (tests, scripts/cog_predict.py) local files are the caller's."""
        if not self.active:
            return
        for name, path in files.items():
            if path is not None and Path(os.path.abspath(path)).parent != self.folder:
                raise UserError(
                    f"{name} must be a data: URI or an http(s) URL; server paths and other schemes are not accepted."
                )

    def sweep(self, keep: list[Path | None]) -> int:
        """As a prediction starts: remove earlier predictions' leftover downloads, never the files in
        `keep` (this prediction's inputs), and coglet's stale empty folders; returns how many downloads
        went. Does nothing unless isolate() ran (outside Cog's worker)."""
        if not self.active:
            return 0
        prune_empty_dirs(COGLET_PREDICTIONS)
        keep_names = {Path(p).name for p in keep if p is not None and Path(p).parent == self.folder}
        removed = 0
        for entry in os.scandir(self.folder) if self.folder.is_dir() else ():
            if entry.name in keep_names or not self.DOWNLOAD_NAME.match(entry.name):
                continue
            if entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info("removed %d input file(s) left by failed downloads", removed)
        return removed


def exit_on_sigterm(root: Path) -> None:
    """A SIGTERM sent to the worker itself (systemd's control-group stop, `kill -- -PGID`) ends it by
    the default action, which runs no exit handler: the worker's folders in `root` stayed. Where
    nothing else handles SIGTERM, a thread of ours hears it (through Python's wakeup fd, which the
    signal's C handler writes at once, even while the main thread is inside coglet's Rust code),
    removes this process's folders, and ends the process (status 143, as a shell reports SIGTERM). Can go when
    coglet's worker exits through Python on SIGTERM (tests/test_front.py's SIGTERM test passes
    without this)."""
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the work is the thread's
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        with reader, writer:  # the thread holds both ends for the life of the process
            while (received := reader.recv(1)) and received[0] != signal.SIGTERM:
                pass
        if received:
            remove_folders_of(os.getpid(), root)
            os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="sigterm-cleanup", daemon=True).start()


def remove_folders_of(pid: int, root: Path) -> None:
    for entry in root.glob(f"flux-*-{pid}*"):
        match = WORKER_FOLDER.match(entry.name)
        if match is not None and int(match.group(1)) == pid and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def remove_dead_workers_folders(root: Path) -> int:
    """Remove the worker folders (WORKER_FOLDER) in `root` of processes that no longer run, and the output
    folders of an earlier process with this one's pid (a container restarts with the same pids; this
    process has written none yet); returns how many went. A worker killed outright (SIGKILL, the OOM
    killer, a SIGTERM sent to the worker itself) runs no exit handler."""
    removed = 0
    for entry in root.glob("flux-*"):
        match = WORKER_FOLDER.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        pid = int(match.group(1))
        mine = pid == os.getpid()
        if (mine and entry.name.startswith("flux-out-")) or (not mine and not _process_alive(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        logger.info("removed %d folder(s) left in %s by workers that were killed", removed, root)
    return removed


def prune_empty_dirs(root: Path, older_than: float = STALE_AFTER_S) -> int:
    """Remove the folders directly under `root` that hold no file at all and have not changed for
    `older_than` seconds (coglet's leftovers); returns how many went. Never removes a file: rmdir
    refuses a folder that is not empty, so a folder still in use is left alone."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    now, removed = time.time(), 0
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            folders = [entry.path]
            for parent, dirs, files in os.walk(entry.path):
                if files or any(os.path.islink(os.path.join(parent, d)) for d in dirs):
                    raise OSError("not empty")
                folders.extend(os.path.join(parent, d) for d in dirs)
            if any(now - os.stat(folder).st_mtime < older_than for folder in folders):
                continue
            for folder in reversed(folders):  # children before parents
                os.rmdir(folder)
            removed += 1
        except OSError:
            continue
    if removed:
        logger.debug("removed %d empty folder(s) from %s", removed, root)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True
