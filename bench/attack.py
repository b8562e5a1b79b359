#!/usr/bin/env python3
"""The hub under attack (issue 19): peak RSS and a well-behaved publisher's latency per attack.

    bench/attack.py --binary target/release/ssehub                       # every attack
    bench/attack.py --binary ./ssehub --attack idle-h2 --attack templates --json out.json

Python 3.11, standard library only; Linux (RSS comes from /proc/PID/status). Only 127.0.0.1 is
targeted. For each attack a fresh hub is started on a free port:

    PATH serve --listen 127.0.0.1:PORT --publisher-jwt-key KEY --clock-interval 0 [flags]

(`idle-h2-fdlimit` starts it through `prlimit --nofile=1024:1024`), and beside the attack run:

* a well-behaved publisher (a process of its own, so that the attacker's Python does not skew
  its timings): one keep-alive HTTP/1.1 connection, ~50 publishes/s of `topic=witness&data=N`,
  each publish's answer time measured (5 s timeout; a broken connection is opened again);
* a "new connection" probe in that process: once a second a publish on a fresh connection
  (2 s timeout), to see whether the hub still takes new clients;
* a witness subscriber (`?topic=witness`) that counts the `data:` it receives, reconnecting
  with `Last-Event-ID` if its stream breaks, to report lost (answered 200, never received) and
  duplicated updates;
* the hub's VmRSS, sampled every 200 ms.

Publisher figures cover the attack only (its start to its end, after a 2 s quiet warm-up).
Latency percentiles are over the publishes answered 200 and those that timed out, the latter
at their elapsed time (a lower bound, shown `≥`); other failures are only counted.
"RSS end" is taken when the attack is over and its connections are closed: what the hub kept.

Attacks (`--attack NAME`, repeatable; default all, in this order):

none                no attack: the baseline (10 s).
idle-h2             3,000 h2c connections: preface + empty SETTINGS, ACK the hub's SETTINGS
                    (and PINGs), a PING each second; held 30 s. Open counts at 15 s and 30 s.
idle-h2-fdlimit     the same with 1,100 connections against a hub limited to 1,024 descriptors.
templates           2,000 anonymous GETs, each with its own 64-expression template
                    (`u<i>{?p0}…{?p63}`), closed after the response head; then 1,000 held (10 s).
template-lock       2,000 held anonymous subscribers to `https://example.com/u<i>/{x}`; midway,
                    one publish of 250 topics × 4,000 bytes (`--max-body 2MiB`). The topics are
                    `https://example.com/u<k>/aaa…a/z`: each is a candidate for one template,
                    which scans it whole and fails at the last `/`, so the publish costs the
                    matching (under the hub's lock) but fans nothing out. The publisher's max
                    latency within 1 s around that publish is reported.
template-lock-prefixes  (beyond issue 19's list) the same with templates whose literal prefixes
                    have 2,000 different lengths (`https://example.com/` + i × `a` + `{x}`) and
                    topics that every one of them is a candidate for: the prefix index no
                    longer narrows the matching down.
history-bytes       300 publishes of 1 MB of data (`--max-body 2MiB`, default history settings).
topic-bytes         2,000 idle subscribers with 15 topics of ≈ 4,000 bytes each (statuses
                    counted), held 5 s, closed; RSS held and RSS 10 s after closing.
subscription-churn  `--subscriptions`: 50 real updates, then 3,000 anonymous subscribe/close
                    requests of 200 topics each (at most 30 s); then a subscriber resumes from the
                    first real update's id: how many of the 49 later ones come back.

A Markdown table goes to stdout (progress to stderr); `--json OUT` writes every figure.
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import queue
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter

HOST = "127.0.0.1"
KEY = "attack-bench-hs256-secret-0123456789abcdef"  # ≥ 32 bytes, or the hub warns
MERCURE = "/.well-known/mercure"
CONNECT_TIMEOUT = 5.0
HEAD_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 5.0
PROBE_TIMEOUT = 2.0
PUBLISH_INTERVAL = 0.02  # ~50 publishes a second
WARMUP = 2.0
RSS_PERIOD = 0.2


def log(msg):
    print(f"[attack] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A failure of the bench itself (the hub did not start, a token could not be made…)."""


# --------------------------------------------------------------------------------------------
# Blocking HTTP/1.1 (the well-behaved clients)
# --------------------------------------------------------------------------------------------

class BlockingConn:
    """One HTTP/1.1 connection; every read is bounded by a deadline (TimeoutError past it)."""

    def __init__(self, port, timeout):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data, deadline):
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        self.sock.sendall(data)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by the hub")
        self.buf += data

    def read_until(self, sep, deadline, limit=1 << 20):
        """Bytes up to and including `sep`; nothing is consumed on a timeout."""
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise ConnectionError("line too long")
            self._fill(deadline)

    def read_exact(self, n, deadline):
        while len(self.buf) < n:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self, deadline):
        return parse_head(self.read_until(b"\r\n\r\n", deadline, 64 * 1024))

    def read_chunk(self, deadline):
        """One chunk of a chunked body (b"" for the last); consumed only when whole."""
        i = self.buf.find(b"\r\n")
        while i < 0:
            self._fill(deadline)
            i = self.buf.find(b"\r\n")
        size = int(bytes(self.buf[:i]).split(b";")[0], 16)
        while len(self.buf) < i + 2 + size + 2:
            self._fill(deadline)
        data = bytes(self.buf[i + 2: i + 2 + size])
        del self.buf[: i + 2 + size + 2]
        return data

    def read_body(self, headers, deadline):
        if headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while chunk := self.read_chunk(deadline):
                out += chunk
            return out
        return self.read_exact(int(headers.get("content-length", "0")), deadline)

    def request(self, raw, timeout):
        deadline = time.monotonic() + timeout
        self.send(raw, deadline)
        status, headers = self.read_head(deadline)
        body = self.read_body(headers, deadline)
        return status, headers, body


def parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ConnectionError(f"not an HTTP answer: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


def publish_request(token, form, close=False):
    body = form if isinstance(form, bytes) else form.encode()
    return (
        f"POST {MERCURE} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode() + body


def get_request(query, headers=None):
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"GET {MERCURE}?{query} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode()


# --------------------------------------------------------------------------------------------
# The well-behaved clients, in a process of their own
# --------------------------------------------------------------------------------------------

def well_behaved(port, token, ready, stop, results):
    """Publisher, probe and witness threads; puts their records on `results` once `stop` is set."""
    state = {"acked": set(), "received": Counter(), "witness_reconnects": 0,
             "witness_errors": Counter(), "publishes": [], "probes": []}
    witness_up = threading.Event()
    witness_stop = threading.Event()

    def witness():
        last_id = None
        connected_once = False
        while not witness_stop.is_set():
            conn = None
            try:
                conn = BlockingConn(port, CONNECT_TIMEOUT)
                headers = {"Last-Event-ID": last_id} if last_id else {}
                conn.send(get_request("topic=witness", headers), time.monotonic() + HEAD_TIMEOUT)
                status, h = conn.read_head(time.monotonic() + HEAD_TIMEOUT)
                if status != 200:
                    raise ConnectionError(f"witness got HTTP {status}")
                if connected_once:
                    state["witness_reconnects"] += 1
                connected_once = True
                witness_up.set()
                chunked = h.get("transfer-encoding", "").lower() == "chunked"
                pending, event = b"", {}
                while not witness_stop.is_set():
                    try:
                        if chunked:
                            data = conn.read_chunk(time.monotonic() + 0.5)
                            if not data:
                                raise ConnectionError("the witness stream ended")
                        else:
                            conn._fill(time.monotonic() + 0.5)
                            data, conn.buf = bytes(conn.buf), bytearray()
                    except TimeoutError:
                        continue
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        line = line.rstrip(b"\r")
                        if not line:
                            if "data" in event:
                                try:
                                    state["received"][int(event["data"])] += 1
                                except ValueError:
                                    pass
                            if "id" in event:
                                last_id = event["id"]
                            event = {}
                        elif line.startswith(b"data:"):
                            event["data"] = line[5:].strip().decode()
                        elif line.startswith(b"id:"):
                            event["id"] = line[3:].strip().decode()
            except Exception as e:  # noqa: BLE001 - any failure: count it, reconnect
                state["witness_errors"][type(e).__name__] += 1
                time.sleep(0.2)
            finally:
                if conn:
                    conn.close()

    def publisher():
        conn, n = None, 0
        next_at = time.monotonic()
        while not stop.is_set():
            wait = next_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            next_at = max(next_at + PUBLISH_INTERVAL, time.monotonic())
            sent = time.monotonic()
            ok, err = False, None
            try:
                if conn is None:
                    conn = BlockingConn(port, CONNECT_TIMEOUT)
                status, h, _ = conn.request(
                    publish_request(token, f"topic=witness&data={n}"), PUBLISH_TIMEOUT)
                ok = status == 200
                err = None if ok else f"HTTP {status}"
                if h.get("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001
                err = type(e).__name__
                if conn:
                    conn.close()
                conn = None
            elapsed = time.monotonic() - sent
            if ok:
                state["acked"].add(n)
            state["publishes"].append((sent, elapsed, ok, err))
            n += 1
        if conn:
            conn.close()

    def probe():
        while not stop.wait(1.0):
            sent = time.monotonic()
            ok, err, conn = False, None, None
            try:
                conn = BlockingConn(port, PROBE_TIMEOUT)
                status, _, _ = conn.request(
                    publish_request(token, "topic=probe&data=x", close=True), PROBE_TIMEOUT)
                ok = status == 200
                err = None if ok else f"HTTP {status}"
            except Exception as e:  # noqa: BLE001
                err = type(e).__name__
            finally:
                if conn:
                    conn.close()
            state["probes"].append((sent, time.monotonic() - sent, ok, err))

    w = threading.Thread(target=witness, daemon=True)
    w.start()
    if not witness_up.wait(HEAD_TIMEOUT):
        why = ", ".join(state["witness_errors"]) or "timeout"
        results.put({"error": f"the witness subscriber could not connect: {why}"})
        return
    ready.set()
    threads = [threading.Thread(target=f, daemon=True) for f in (publisher, probe)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(PUBLISH_TIMEOUT + 1)
    # Let the witness catch up with the last publishes.
    until = time.monotonic() + 3.0
    while time.monotonic() < until and not state["acked"] <= set(state["received"]):
        time.sleep(0.1)
    witness_stop.set()
    w.join(1.0)
    received = state["received"]
    results.put({
        "publishes": state["publishes"],
        "probes": state["probes"],
        "witness_lost": len(state["acked"] - set(received)),
        "witness_duplicates": sum(c - 1 for c in received.values() if c > 1),
        "witness_reconnects": state["witness_reconnects"],
        "witness_errors": dict(state["witness_errors"]),
    })


class WellBehaved:
    def __init__(self, port, token):
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.stop_event, self.results = ctx.Event(), ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=well_behaved, daemon=True,
                                args=(port, token, self.ready, self.stop_event, self.results))

    def start(self):
        self.proc.start()
        deadline = time.monotonic() + HEAD_TIMEOUT + 5
        while not self.ready.wait(0.2):
            if time.monotonic() > deadline or not self.proc.is_alive():
                try:
                    res = self.results.get(timeout=1)
                except queue.Empty:
                    res = {}
                raise BenchError(res.get("error", "the well-behaved clients did not start"))

    def finish(self):
        self.stop_event.set()
        try:
            return self.results.get(timeout=PUBLISH_TIMEOUT + 10)
        except queue.Empty:
            raise BenchError("the well-behaved clients gave no results") from None
        finally:
            self.proc.join(2)
            if self.proc.is_alive():
                self.proc.kill()

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()


# --------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def mint_token(binary):
    try:
        out = subprocess.run([binary, "token", "--jwt-key", KEY, "--publish", "*"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise BenchError(f"cannot mint a publisher token with {binary}: {e}") from None
    return out.stdout.strip()


def read_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Hub:
    """A hub process, its log in a temporary file, and its RSS sampled every 200 ms."""

    def __init__(self, binary, flags, nofile=None):
        self.port = free_port()
        cmd = [binary, "serve", "--listen", f"{HOST}:{self.port}", "--publisher-jwt-key", KEY,
               "--clock-interval", "0", *flags]
        if nofile:
            # prlimit execs the command: the hub keeps prlimit's pid.
            cmd = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *cmd]
        self.cmd = cmd
        self.log = tempfile.NamedTemporaryFile(prefix="ssehub-attack-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.samples = []  # (monotonic, KiB)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            kib = read_rss_kib(self.proc.pid)
            if kib is not None:
                self.samples.append((time.monotonic(), kib))
            self._stop.wait(RSS_PERIOD)

    def wait_ready(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the hub exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                c = BlockingConn(self.port, 1.0)
                try:
                    status, _, _ = c.request(
                        f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(), 2.0)
                finally:
                    c.close()
                if status == 200:
                    self._sampler.start()
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError(f"the hub did not answer /healthz within {timeout:.0f} s: "
                         f"{self.log_tail()}")

    def rss_mib(self):
        kib = read_rss_kib(self.proc.pid)
        return round(kib / 1024, 1) if kib is not None else None

    def peak_mib(self, since=0.0):
        vals = [k for t, k in self.samples if t >= since]
        return round(max(vals) / 1024, 1) if vals else None

    def log_tail(self, n=800):
        try:
            with open(self.log.name, "rb") as f:
                return f.read()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    def stop(self):
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)


# --------------------------------------------------------------------------------------------
# Asynchronous attack helpers
# --------------------------------------------------------------------------------------------

class Ctx:
    """What an attack gets: the hub, the publisher token, and marks it leaves for the report."""

    def __init__(self, hub, token):
        self.hub, self.port, self.token = hub, hub.port, token
        self.marks = {}


async def connect(port, src=HOST):
    async with asyncio.timeout(CONNECT_TIMEOUT):
        return await asyncio.open_connection(HOST, port, local_addr=(src, 0))


async def read_head(reader, timeout=HEAD_TIMEOUT):
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
    return parse_head(head)


async def read_body(reader, headers, timeout=PUBLISH_TIMEOUT):
    async with asyncio.timeout(timeout):
        if headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                out += await reader.readexactly(size)
                await reader.readexactly(2)
                if size == 0:
                    return out
        return await reader.readexactly(int(headers.get("content-length", "0")))


async def send(writer, data, timeout=PUBLISH_TIMEOUT):
    writer.write(data)
    async with asyncio.timeout(timeout):
        await writer.drain()


async def open_stream(port, query, headers=None):
    """Sends a subscribe request; returns (status, headers, reader, writer), or raises."""
    reader, writer = await connect(port)
    try:
        await send(writer, get_request(query, headers))
        status, h = await read_head(reader)
    except BaseException:
        writer.close()
        raise
    return status, h, reader, writer


async def publish_once(reader, writer, token, form, timeout=PUBLISH_TIMEOUT):
    await send(writer, publish_request(token, form), timeout)
    status, h = await read_head(reader, timeout)
    return status, await read_body(reader, h, timeout)


def outcome(e):
    """A short name for what ended a request: `200`, `400`, `TimeoutError`…"""
    return str(e) if isinstance(e, int) else type(e).__name__


async def bounded(count, concurrency, fn, deadline=None):
    """Runs fn(i) for i in range(count), `concurrency` at once, starting none past `deadline`.
    Returns the results (exceptions included) of those started."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            if deadline is not None and time.monotonic() > deadline:
                return None
            try:
                return await fn(i)
            except Exception as e:  # noqa: BLE001 - reported by the caller
                return e

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return [r for r in results if r is not None]


def close_all(writers):
    for w in writers:
        try:
            w.transport.abort()
        except Exception:  # noqa: BLE001
            pass


def status_counts(results):
    """{"200": n, "TimeoutError": m, …} for a list of statuses and exceptions."""
    c = Counter(outcome(r[0] if isinstance(r, tuple) else r) for r in results)
    return dict(sorted(c.items()))


def fmt_counts(counts):
    return ", ".join(f"{k}: {v:,}" for k, v in counts.items())


# --------------------------------------------------------------------------------------------
# Attacks: each returns (figures, one-line note)
# --------------------------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def h2_ping(payload=b"attack!!", ack=False):
    return b"\x00\x00\x08\x06" + (b"\x01" if ack else b"\x00") + b"\x00\x00\x00\x00" + payload


async def attack_none(ctx):
    await asyncio.sleep(10)
    return {}, ""


async def idle_h2(ctx, n, hold):
    """n h2c connections that say nothing but SETTINGS and PING, held `hold` seconds."""
    conns = []  # dicts: writer, served (got the hub's SETTINGS), closed_at
    stop = asyncio.Event()

    async def keep(c, reader):
        buf = b""
        next_ping = time.monotonic() + 1
        while not stop.is_set():
            try:
                async with asyncio.timeout(max(next_ping - time.monotonic(), 0.01)):
                    data = await reader.read(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    kind, flags, payload = buf[3], buf[4], buf[9:9 + length]
                    buf = buf[9 + length:]
                    if kind == 4 and not flags & 1:
                        c["served"] = True
                        c["writer"].write(H2_SETTINGS_ACK)
                    elif kind == 6 and not flags & 1:
                        c["writer"].write(h2_ping(payload, ack=True))
                    elif kind == 7:
                        c["goaway"] = True
            except TimeoutError:
                pass
            except OSError:
                break
            if time.monotonic() >= next_ping:
                next_ping += 1
                try:
                    c["writer"].write(h2_ping())
                    if c["writer"].transport.get_write_buffer_size() > 1 << 16:
                        break  # the hub does not read: not worth holding more in our memory
                except (OSError, RuntimeError):
                    break
        if c["closed_at"] is None and not stop.is_set():
            c["closed_at"] = time.monotonic()

    async def open_one(i):
        reader, writer = await connect(ctx.port)
        writer.write(H2_PREFACE + H2_SETTINGS)
        c = {"writer": writer, "served": False, "goaway": False, "closed_at": None}
        conns.append(c)
        c["task"] = asyncio.create_task(keep(c, reader))

    started = time.monotonic()
    opened = await bounded(n, 200, open_one)
    failed = status_counts([r for r in opened if isinstance(r, Exception)])
    t0 = time.monotonic()
    log(f"  {len(conns):,} h2c connections opened in {t0 - started:.1f} s")

    def still_open():
        return sum(1 for c in conns if c["closed_at"] is None)

    await asyncio.sleep(max(t0 + 15 - time.monotonic(), 0))
    open_15 = still_open()
    await asyncio.sleep(max(t0 + hold - time.monotonic(), 0))
    open_end = still_open()
    stop.set()
    close_all(c["writer"] for c in conns)
    await asyncio.gather(*(c["task"] for c in conns), return_exceptions=True)
    closed_after = sorted(c["closed_at"] - t0 for c in conns if c["closed_at"] is not None)
    figures = {
        "connections": n,
        "opened": len(conns),
        "open_failed": failed,
        "open_seconds": round(t0 - started, 2),
        "served": sum(c["served"] for c in conns),
        "goaway": sum(c["goaway"] for c in conns),
        "open_at_15s": open_15,
        f"open_at_{hold}s": open_end,
        "first_closed_at_s": round(closed_after[0], 1) if closed_after else None,
    }
    note = (f"{len(conns):,}/{n:,} opened, {figures['served']:,} served by the hub; "
            f"open at 15 s: {open_15:,}, at {hold} s: {open_end:,}")
    if failed:
        note += f"; open failures: {fmt_counts(failed)}"
    return figures, note


async def attack_idle_h2(ctx):
    return await idle_h2(ctx, 3000, 30)


async def attack_idle_h2_fdlimit(ctx):
    return await idle_h2(ctx, 1100, 30)


def template_query(i):
    template = f"u{i}" + "".join(f"{{?p{k}}}" for k in range(64))
    return "topic=" + urllib.parse.quote(template, safe="")


async def attack_templates(ctx):
    """2,000 distinct 64-expression templates, each closed after its head; then 1,000 held."""
    deadline = time.monotonic() + 25

    async def brief(i):
        status, _, _, writer = await open_stream(ctx.port, template_query(i))
        writer.transport.abort()
        return status

    brief_results = await bounded(2000, 32, brief, deadline)
    rss_after_brief = ctx.hub.rss_mib()
    held = []

    async def hold(i):
        status, _, _, writer = await open_stream(ctx.port, template_query(2000 + i))
        held.append(writer)
        return status

    held_results = await bounded(1000, 32, hold, deadline)
    await asyncio.sleep(5)
    rss_held = ctx.hub.rss_mib()
    close_all(held)
    await asyncio.sleep(3)
    figures = {
        "brief_statuses": status_counts(brief_results),
        "held_statuses": status_counts(held_results),
        "rss_after_brief_mib": rss_after_brief,
        "rss_held_mib": rss_held,
    }
    note = (f"brief {fmt_counts(figures['brief_statuses'])}; held "
            f"{fmt_counts(figures['held_statuses'])}; RSS after the 2,000: {rss_after_brief} MiB, "
            f"with 1,000 held: {rss_held} MiB")
    return figures, note


async def template_lock(ctx, template, topic):
    """2,000 held subscribers to template(i); midway, one publish to topic(k) for k < 250."""
    held = []

    async def hold(i):
        query = "topic=" + urllib.parse.quote(template(i), safe="")
        status, _, _, writer = await open_stream(ctx.port, query)
        held.append(writer)
        return status

    statuses = status_counts(await bounded(2000, 32, hold, time.monotonic() + 15))
    await asyncio.sleep(5)
    form = "&".join("topic=" + urllib.parse.quote(topic(k), safe="") for k in range(250))
    form += "&data=big"
    reader, writer = await connect(ctx.port)
    start = time.monotonic()
    try:
        status, _ = await publish_once(reader, writer, ctx.token, form, 30)
        big = status
    except Exception as e:  # noqa: BLE001
        big = e
    end = time.monotonic()
    writer.transport.abort()
    ctx.marks["big_publish"] = (start, end)
    await asyncio.sleep(5)
    close_all(held)
    await asyncio.sleep(1)
    figures = {
        "subscriber_statuses": statuses,
        "big_publish_status": outcome(big),
        "big_publish_ms": round((end - start) * 1000, 1),
        "big_publish_bytes": len(form),
    }
    note = (f"subscribers {fmt_counts(statuses)}; big publish {outcome(big)} in "
            f"{ms(figures['big_publish_ms'])} ms")
    return figures, note


def padded(head, tail="/z", size=4000):
    return head + "a" * (size - len(head) - len(tail)) + tail


async def attack_template_lock(ctx):
    """Templates `https://example.com/u<i>/{x}`; topic k is `…/u<k>/aaa…a/z`: a candidate for
    template k alone (the prefix index), which scans it and fails at the last `/`."""
    return await template_lock(ctx, lambda i: f"https://example.com/u{i}/{{x}}",
                               lambda k: padded(f"https://example.com/u{k}/"))


async def attack_template_lock_prefixes(ctx):
    """Not in issue 19's list. Templates `https://example.com/` + i × `a` + `{x}`: 2,000
    literal prefixes of 2,000 lengths, so each topic `https://example.com/aaa…a<k>aaa…a/z`
    costs 2,000 prefix lookups and is a candidate for every template, each scanning it to the
    final `/` (which `{x}` does not match)."""
    return await template_lock(ctx, lambda i: "https://example.com/" + "a" * i + "{x}",
                               lambda k: padded("https://example.com/" + "a" * 3000 + f"{k:03d}"))


async def attack_history_bytes(ctx):
    """300 publishes of 1 MB each, one after the other on one connection."""
    body = b"topic=bulk&data=" + b"a" * 1_000_000
    reader, writer = await connect(ctx.port)
    results, start = [], time.monotonic()
    for _ in range(300):
        try:
            status, _ = await publish_once(reader, writer, ctx.token, body, 10)
            results.append(status)
        except Exception as e:  # noqa: BLE001
            results.append(e)
            writer.close()
            try:
                reader, writer = await connect(ctx.port)
            except Exception:  # noqa: BLE001
                break
        if time.monotonic() - start > 25:
            break
    took = time.monotonic() - start
    writer.close()
    await asyncio.sleep(3)
    figures = {"statuses": status_counts(results), "publish_seconds": round(took, 1)}
    return figures, f"{fmt_counts(figures['statuses'])} in {took:.1f} s"


async def attack_topic_bytes(ctx):
    """2,000 idle subscribers, 15 topics of about 4,000 bytes each, held then closed."""
    held = []

    def query(i):
        topics = []
        for j in range(15):
            head = f"s{i}-{j}-"
            topics.append(head + "a" * (3990 - len(head)))
        return "&".join("topic=" + t for t in topics)

    async def hold(i):
        status, _, _, writer = await open_stream(ctx.port, query(i))
        if status == 200:
            held.append(writer)
        else:
            writer.transport.abort()
        return status

    statuses = status_counts(await bounded(2000, 32, hold, time.monotonic() + 20))
    await asyncio.sleep(5)
    rss_held = ctx.hub.rss_mib()
    close_all(held)
    await asyncio.sleep(10)
    rss_after = ctx.hub.rss_mib()
    figures = {"statuses": statuses, "rss_held_mib": rss_held, "rss_10s_after_close_mib": rss_after}
    note = (f"{fmt_counts(statuses)}; RSS held: {rss_held} MiB, 10 s after closing: "
            f"{rss_after} MiB")
    return figures, note


async def attack_subscription_churn(ctx):
    """50 real updates, then subscribe/close churn with 200 topics each, then a resume."""
    reader, writer = await connect(ctx.port)
    ids = []
    for k in range(50):
        status, body = await publish_once(reader, writer, ctx.token, f"topic=real&data=real-{k}")
        if status != 200:
            raise BenchError(f"a real update got HTTP {status}")
        ids.append(body.decode().strip())
    writer.close()

    async def churn(i):
        query = "&".join(f"topic=churn-{i}-{j}" for j in range(200))
        status, _, _, w = await open_stream(ctx.port, query)
        w.transport.abort()
        return status

    start = time.monotonic()
    statuses = status_counts(await bounded(3000, 16, churn, start + 30))
    took = time.monotonic() - start
    await asyncio.sleep(2)  # the last unsubscribe events

    status, h, reader, writer = await open_stream(ctx.port, "topic=real",
                                                  {"Last-Event-ID": ids[0]})
    back = set()
    if status == 200:
        buf = b""
        try:
            while True:  # the replay comes at once; stop after 2 s without anything new
                async with asyncio.timeout(2):
                    data = await reader.read(65536)
                if not data:
                    break
                buf += data
        except TimeoutError:
            pass
        for line in buf.split(b"\n"):
            if line.startswith(b"data: real-"):
                back.add(int(line[len(b"data: real-"):].strip()))
    writer.transport.abort()
    recovered = len(back - {0})
    figures = {
        "churn_statuses": statuses,
        "churn_done": sum(statuses.values()),
        "churn_seconds": round(took, 1),
        "resume_status": status,
        "resume_last_event_id": h.get("last-event-id"),
        "recovered_of_49": recovered,
    }
    note = (f"{figures['churn_done']:,} churned in {took:.0f} s ({fmt_counts(statuses)}); resume "
            f"answered Last-Event-ID {figures['resume_last_event_id']!r}: {recovered}/49 back")
    return figures, note


# name -> (function, hub flags, hub open-file limit)
ATTACKS = {
    "none": (attack_none, [], None),
    "idle-h2": (attack_idle_h2, [], None),
    "idle-h2-fdlimit": (attack_idle_h2_fdlimit, [], 1024),
    "templates": (attack_templates, [], None),
    "template-lock": (attack_template_lock, ["--max-body", "2MiB"], None),
    "template-lock-prefixes": (attack_template_lock_prefixes, ["--max-body", "2MiB"], None),
    "history-bytes": (attack_history_bytes, ["--max-body", "2MiB"], None),
    "topic-bytes": (attack_topic_bytes, [], None),
    "subscription-churn": (attack_subscription_churn, ["--subscriptions"], None),
}


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------

def percentile(sorted_values, p):
    if not sorted_values:
        return None
    rank = max(int(-(-p * len(sorted_values) // 100)) - 1, 0)  # nearest rank
    return sorted_values[min(rank, len(sorted_values) - 1)]


def publisher_figures(records, start, end):
    """Answer times of the publishes sent in [start, end]. A publish that timed out counts at
    its elapsed time (a lower bound, flagged); other failures are only counted."""
    during = [r for r in records if start <= r[0] <= end]
    times = sorted((r[1] * 1000, not r[2]) for r in during if r[2] or r[3] == "TimeoutError")
    errors = Counter(r[3] for r in during if not r[2])

    def pick(p):
        v = percentile(times, p)
        return (round(v[0], 2), v[1]) if v else (None, False)

    (p50, p50_t), (p99, p99_t), (top, top_t) = pick(50), pick(99), pick(100)
    answers = sorted(r[0] + r[1] for r in during if r[2])
    gaps = [b - a for a, b in zip(answers, answers[1:])]
    return {
        "count": len(during),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": top,
        # True where the figure is a publish that timed out: the real answer time is longer.
        "timed_out": {"p50": p50_t, "p99": p99_t, "max": top_t},
        # The longest time between two successive answers: how long publishing stood still.
        "longest_silence_ms": round(max(gaps) * 1000, 1) if gaps else None,
    }


def ms(v, timed_out=False):
    """A duration in ms for the table, `≥` before a lower bound."""
    if v is None:
        return "–"
    text = f"{v:,.2f}" if v < 10 else f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"
    return ("≥ " if timed_out else "") + text


def run_attack(name, binary, token):
    fn, flags, nofile = ATTACKS[name]
    hub = Hub(binary, flags, nofile)
    wb = None
    log(f"{name}: hub on port {hub.port}" + (f" with {' '.join(flags)}" if flags else "")
        + (f", open files {nofile}" if nofile else ""))
    try:
        hub.wait_ready()
        wb = WellBehaved(hub.port, token)
        wb.start()
        time.sleep(WARMUP)
        rss_before = hub.rss_mib()
        ctx = Ctx(hub, token)
        start = time.monotonic()
        figures, note = asyncio.run(fn(ctx))
        end = time.monotonic()
        rss_end = hub.rss_mib()
        peak = hub.peak_mib()
        if hub.proc.poll() is not None:
            note += f"; THE HUB EXITED ({hub.proc.returncode})"
        clients = wb.finish()
        if "error" in clients:
            raise BenchError(clients["error"])
        pub = publisher_figures(clients["publishes"], start, end)
        if "big_publish" in ctx.marks:
            b0, b1 = ctx.marks["big_publish"]
            around = publisher_figures(clients["publishes"], b0 - 1, b1 + 1)
            figures["publisher_max_ms_around_big_publish"] = around["max_ms"]
            figures["publisher_failed_around_big_publish"] = around["failed"]
            note += (f"; publisher max {ms(around['max_ms'], around['timed_out']['max'])} ms"
                     " within 1 s of it")
        probes = publisher_figures(clients["probes"], start, end)
        return {
            "attack": name,
            "hub_flags": flags,
            "hub_nofile": nofile,
            "duration_s": round(end - start, 1),
            "rss_before_mib": rss_before,
            "rss_peak_mib": peak,
            "rss_end_mib": rss_end,
            "publisher": pub,
            "new_connection_probes": probes,
            "witness_lost": clients["witness_lost"],
            "witness_duplicates": clients["witness_duplicates"],
            "witness_reconnects": clients["witness_reconnects"],
            "witness_errors": clients["witness_errors"],
            "figures": figures,
            "note": note,
        }
    finally:
        if wb:
            wb.kill()
        hub.stop()


def mib(v):
    return "–" if v is None else f"{v:,.1f}"


def markdown(results):
    rows = [
        "| attack | peak RSS MiB | RSS end MiB | publish p50 ms | p99 ms | max ms "
        "| publishes failed | new-conn probes failed | witness lost / dup | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['attack']} | " + " | ".join(["–"] * 8) + f" | ERROR: {r['error']} |")
            continue
        p, q = r["publisher"], r["new_connection_probes"]
        t = p["timed_out"]
        rows.append(
            f"| {r['attack']} | {mib(r['rss_peak_mib'])} | {mib(r['rss_end_mib'])} "
            f"| {ms(p['p50_ms'], t['p50'])} | {ms(p['p99_ms'], t['p99'])} "
            f"| {ms(p['max_ms'], t['max'])} "
            f"| {p['failed']:,} / {p['count']:,} | {q['failed']:,} / {q['count']:,} "
            f"| {r['witness_lost']:,} / {r['witness_duplicates']:,} | {r['note']} |")
    return "\n".join(rows)


def raise_open_file_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Attacks: " + ", ".join(ATTACKS))
    parser.add_argument("--binary", required=True, help="the ssehub binary to attack")
    parser.add_argument("--attack", action="append", choices=list(ATTACKS), metavar="NAME",
                        help="an attack to run (repeatable; default: all): "
                             + ", ".join(ATTACKS))
    parser.add_argument("--json", metavar="OUT", help="write every figure to this file")
    args = parser.parse_args()

    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        sys.exit(f"attack.py: {binary} is not an executable")
    limit = raise_open_file_limit()
    if limit < 4000:
        sys.exit(f"attack.py: the open-file limit is {limit}; at least 4,000 needed")
    names = args.attack or list(ATTACKS)
    try:
        token = mint_token(binary)
    except BenchError as e:
        sys.exit(f"attack.py: {e}")
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = None

    results = []
    for name in names:
        try:
            results.append(run_attack(name, binary, token))
            log(f"  {results[-1]['note']}")
        except KeyboardInterrupt:
            log("interrupted")
            break
        except Exception as e:  # noqa: BLE001 - one attack failing does not stop the others
            log(f"{name} failed: {type(e).__name__}: {e}")
            results.append({"attack": name, "error": f"{type(e).__name__}: {e}"})

    print(markdown(results))
    if args.json:
        report = {
            "binary": binary,
            "version": version,
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0 if results and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
