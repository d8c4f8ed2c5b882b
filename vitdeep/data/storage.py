"""Opening shards and the files beside them so that no read can hang a run or outlive it.

Every remote read has a timeout and a bounded number of retries (`ReadPolicy`, one per process:
`use_read_policy`; a loader hands it to its workers). By kind of URL:

- local paths and `file:` URLs: plain files. A vanished or unreadable file fails at once
  (retrying a local file does not bring it back).
- `http://`, `https://`: read here, with urllib and a socket timeout, not by a `curl` subprocess
  (webdataset's way, which has no read timeout and leaves an orphan when its reader is killed).
  A response that stalls or is cut off is continued from the byte where it stopped with an HTTP
  `Range` request; from a server that ignores ranges it is read again from the start and the bytes
  already delivered are skipped. The reader sees one unbroken stream, so a transient stall costs
  nothing. Client errors (4xx but 408 / 429) fail at once: asking again would get the same answer.
  A shard that changes on the server between tries (its size or ETag) fails rather than splicing
  two versions.
- `pipe:COMMAND` and `gs://` (`gsutil cat`, as webdataset runs it): the command's output, which
  fails when nothing arrives for the timeout or when the command exits non-zero; a retry runs it
  again and skips what was delivered. The command, and whatever it started, is killed when its
  stream is closed or fails, and when the process reading it dies, however it dies.
- other schemes webdataset knows (`hf://`, `sftp://` …): webdataset's `gopen`, without these
  guarantees.

A read that still fails after its retries raises `ShardReadError` (an `OSError`); what it costs in
samples is decided by the caller (`vitdeep.data.samples.shard_slots`).
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import select
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from vitdeep.data.children import child_setup
from vitdeep.data.options import ReadPolicy

logger = logging.getLogger(__name__)

#: Bytes per read from a connection or a command (the tar reader asks for 10 KB at a time).
BUFFER_SIZE = 1 << 20
#: HTTP client errors that may go away when asked again.
_TRANSIENT_HTTP = (408, 429)

_policy = ReadPolicy()


def use_read_policy(policy: ReadPolicy) -> None:
    """Set the timeouts and retries of every read this process (and the loader workers it starts
    from now on) makes; commands call it once with the user's options."""
    global _policy
    _policy = policy


def read_policy() -> ReadPolicy:
    return _policy


class ShardReadError(OSError):
    """A read that failed for good: after its retries, or at once when retrying cannot help."""


class _Final(Exception):
    """A failure that retrying cannot mend (the message says which)."""


def open_shard(url: str, policy: ReadPolicy | None = None) -> BinaryIO:
    """A binary stream of the shard (or other file) at `url`, read under `policy` (default: the
    process's). Raises `OSError` when it cannot be opened."""
    policy = policy or _policy
    scheme = urlparse(url).scheme
    if url.startswith("pipe:"):
        raw: io.RawIOBase = _Command(url, url[len("pipe:"):], policy)
    elif scheme in ("http", "https"):
        raw = _Http(url, policy)
    elif scheme == "gs":
        raw = _Command(url, shlex.join(["gsutil", "cat", url]), policy)
    elif scheme in ("", "file"):
        return open(url2pathname(urlparse(url).path) if scheme == "file" else url, "rb")
    else:
        from webdataset.gopen import gopen

        try:
            return gopen(url)
        except ValueError as error:  # a scheme webdataset does not know either
            raise ShardReadError(str(error)) from None
    return io.BufferedReader(raw, BUFFER_SIZE)


def _describe(error: BaseException, timeout: float) -> str:
    """What went wrong, in a few words (for the warning of a retry and the final error)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        if not isinstance(error.reason, BaseException):
            return str(error.reason)[:300]
        error = error.reason
    if isinstance(error, TimeoutError) and str(error) in ("", "timed out"):
        return f"nothing received for {timeout:g} s"
    text = str(error)
    return text[:300] if text and isinstance(error, (OSError, _Final)) else f"{type(error).__name__}: {text}"[:300]


class _Resumable(io.RawIOBase):
    """A byte stream read through connections that may stall or break. `_connect` opens one that
    continues at byte `position` (or skips to it), `_read` reads from it and `_disconnect` drops
    it; a failure drops the connection and, up to the policy's retries, tries again after a
    logged wait."""

    def __init__(self, url: str, policy: ReadPolicy):
        super().__init__()
        self.url = url
        self.policy = policy
        self.position = 0
        self.retries = 0
        self._connected = False
        self._retrying(lambda: 0)  # connect now: a shard that is not there fails when opened

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._retrying(lambda: self._read(buffer))
        self.position += count
        return count

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()

    def _retrying(self, action: Callable[[], int]) -> int:
        while True:
            try:
                if not self._connected:
                    self._connected = True
                    self._connect()
                return action()
            except (OSError, http.client.HTTPException, ValueError, _Final) as error:
                self._drop()
                tries = self.retries + 1
                if isinstance(error, _Final) or self._final(error) or self.retries >= self.policy.read_retries:
                    after = f" after {tries} tries" if tries > 1 else ""
                    raise ShardReadError(f"{_describe(error, self.policy.read_timeout)} at byte {self.position:,}{after}") from None
                self.retries += 1
                wait = self.policy.backoff(self.retries)
                logger.warning("reading %s: %s at byte %s; retry %d of %d in %g s", self.url, _describe(error, self.policy.read_timeout),
                               f"{self.position:,}", self.retries, self.policy.read_retries, wait)
                time.sleep(wait)

    def _drop(self) -> None:
        if self._connected:
            self._connected = False
            self._disconnect()

    def _skip(self, count: int) -> None:
        """Discard the first `count` bytes of a connection that restarted from the beginning."""
        scratch = bytearray(min(count, BUFFER_SIZE))
        while count:
            got = self._read(memoryview(scratch)[: min(count, len(scratch))])
            if not got:
                raise ConnectionError(f"the stream ended {count:,} bytes before the {self.position:,} already read")
            count -= got

    def _final(self, error: BaseException) -> bool:
        """Whether retrying cannot mend `error` (besides `_Final`)."""
        return isinstance(error, ValueError)

    def _connect(self) -> None:
        raise NotImplementedError

    def _read(self, buffer) -> int:
        raise NotImplementedError

    def _disconnect(self) -> None:
        raise NotImplementedError


class _Http(_Resumable):
    """An HTTP(S) GET, continued by `Range` requests (or re-read and skipped) after a failure."""

    def __init__(self, url: str, policy: ReadPolicy):
        self._response: http.client.HTTPResponse | None = None
        self.size: int | None = None  # the whole body's bytes, when the server said
        self.version: str | None = None  # its ETag or Last-Modified
        super().__init__(url, policy)

    def _connect(self) -> None:
        resuming = self.position > 0
        headers = {"User-Agent": "vitdeep", **({"Range": f"bytes={self.position}-"} if resuming else {})}
        request = urllib.request.Request(self.url, headers=headers)
        self._response = response = urllib.request.urlopen(request, timeout=self.policy.read_timeout)
        version = response.headers.get("ETag") or response.headers.get("Last-Modified")
        length = _number(response.headers.get("Content-Length"))
        if not resuming:
            self.size, self.version = (length if response.status == 200 else None), version
            return
        if version and self.version and version != self.version:
            raise _Final(f"changed on the server while being read ({self.version} → {version})")
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != self.position or (total is not None and self.size is not None and total != self.size):
                raise _Final(f"the server resumed at byte {start} of {total} after {self.position:,} of {self.size} bytes")
            return
        if length is not None and self.size is not None and length != self.size:
            raise _Final(f"changed on the server while being read ({self.size:,} → {length:,} bytes)")
        self._skip(self.position)  # a server that ignores ranges sends it all again

    def _read(self, buffer) -> int:
        # One receive at most: what arrived before a stall is delivered, not lost with it.
        data = self._response.read1(len(buffer))
        count = len(data)
        buffer[:count] = data
        if not count and len(buffer) and self.size is not None and self.position < self.size:
            raise ConnectionError(f"the connection closed {self.size - self.position:,} bytes short")
        return count

    def _disconnect(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def _final(self, error: BaseException) -> bool:
        if isinstance(error, urllib.error.HTTPError):
            error.close()
            return 400 <= error.code < 500 and error.code not in _TRANSIENT_HTTP
        return super()._final(error)


def _number(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None


def _content_range(header: str) -> tuple[int | None, int | None]:
    """(first byte, total bytes or None) of a `Content-Range: bytes FIRST-LAST/TOTAL` header."""
    unit, _, spec = header.partition(" ")
    span, _, total = spec.partition("/")
    first = span.partition("-")[0]
    if unit != "bytes" or not first.isdigit():
        return None, None
    return int(first), _number(total)


#: How a command runs: under a shell of its own process group that, when told by SIGTERM, kills
#: the whole group. The kernel sends it SIGTERM when this process dies (`child_setup`), which it
#: can only ask for its own child: the shell's children (a `curl` in `curl … | tar …`) would be
#: orphaned otherwise. The command runs in the background so that the shell, waiting, takes the
#: signal at once; its output and exit status are the command's.
_SUPERVISED = 'trap "kill -9 0" TERM\n{{ {command}\n}} &\nwait $!'


class _Command(_Resumable):
    """A shell command's standard output, read with a timeout. The command runs in its own
    session (a Ctrl-C at the terminal is for the run, which decides when its readers stop), and
    its process group is killed when the stream is dropped or this process dies."""

    def __init__(self, url: str, command: str, policy: ReadPolicy):
        self.command = command
        self._process: subprocess.Popen | None = None
        super().__init__(url, policy)

    def _connect(self) -> None:
        self._process = subprocess.Popen(
            ["/bin/sh", "-c", _SUPERVISED.format(command=self.command)], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, bufsize=0, preexec_fn=child_setup(signal.SIGTERM), start_new_session=True,
        )
        self._skip(self.position)

    def _read(self, buffer) -> int:
        process = self._process
        ready, _, _ = select.select([process.stdout], [], [], self.policy.read_timeout)
        if not ready:
            raise TimeoutError(f"the command printed nothing for {self.policy.read_timeout:g} s")
        count = process.stdout.readinto(buffer)
        if not count and len(buffer):
            try:
                status = process.wait(self.policy.read_timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"the command closed its output but did not exit for {self.policy.read_timeout:g} s") from None
            if status:
                raise ChildProcessError(f"the command exited with status {status}")
        return count

    def _disconnect(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
        process.stdout.close()
