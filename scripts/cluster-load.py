#!/usr/bin/env python3
"""Load and fault driver for the local Restate cluster (scripts/run-cluster.sh).

Drives CreatePayment, closed loop, through one or more ingresses at once (each
of --concurrency workers per ingress sends its next request when the last one
is answered), runs fault commands at given times (e.g. SIGKILL a node), then
checks what every request left behind:

  - every payment acknowledged with 200 is there (GetPayment) with the same
    chargeId: nothing acknowledged was lost;
  - every other request (error, timeout, connection refused) left either no
    payment (404) or a completed one, none pending: nothing half-done;
  - optionally, with --ledger, that the mock gateway charged no payment twice.

It prints a per-second timeline per ingress, a summary per phase (the times
between events) and per ingress, how long each ingress failed and the longest
time it completed nothing. Python standard library only (a minimal HTTP/1.1
keep-alive client on asyncio), so nothing to install.

Examples (cluster started with GATEWAY_DELAY_MS=0 GATEWAY_DECLINE_RATE=0):

  # all three up, 30 s, 16 workers per ingress
  scripts/cluster-load.py -d 30 -c 16

  # SIGKILL node 2 after 20 s, start it again at 50 s, run 80 s
  scripts/cluster-load.py -d 80 -c 16 \\
      --event '20=scripts/cluster-lib.sh kill 2' \\
      --event '50=scripts/cluster-lib.sh start 2'

Ingresses default to the cluster's (INGRESS_PORTS, as scripts/cluster-lib.sh).
"""

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from urllib.parse import urlsplit

CREATE_BODY = (
    b'{"amount":10000,"currency":"USD","description":"cluster load",'
    b'"customerId":"cust-cluster"}'
)


class HttpError(Exception):
    """The connection broke in a way worth naming (kind is a short label)."""

    def __init__(self, kind):
        super().__init__(kind)
        self.kind = kind


class Conn:
    """One HTTP/1.1 keep-alive connection; reconnects lazily."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except Exception:  # noqa: BLE001 - closing a broken socket
                pass
        self.reader = self.writer = None

    async def request(self, path, body):
        if self.writer is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            except ConnectionRefusedError as e:
                raise HttpError("refused") from e
            except OSError as e:
                raise HttpError("connect-error") from e
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            status_line = await self.reader.readline()
            if not status_line:
                raise HttpError("closed")
            status = int(status_line.split(b" ", 2)[1])
            length, chunked, close = None, False, False
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                value = value.strip()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and value.lower() == b"close":
                    close = True
            if chunked:
                parts = []
                while True:
                    size = int((await self.reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        await self.reader.readline()
                        break
                    parts.append(await self.reader.readexactly(size))
                    await self.reader.readline()
                data = b"".join(parts)
            elif length is not None:
                data = await self.reader.readexactly(length)
            else:
                data = await self.reader.read()
                close = True
        except HttpError:
            await self.close()
            raise
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as e:
            await self.close()
            raise HttpError("reset") from e
        except OSError as e:
            await self.close()
            raise HttpError("io-error") from e
        if close:
            await self.close()
        return status, data


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_ticks():
    """CPU ticks the whole machine spent busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def process_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


class CpuSampler:
    """Where the machine's CPU went during the run: the cluster's processes (pid
    files in --run-dir), this driver, and everything else on the machine."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.cluster = self.driver = self.machine = 0
        self.seconds = 0.0

    def pids(self):
        out = []
        try:
            for name in os.listdir(self.run_dir):
                if name.endswith(".pid"):
                    with open(os.path.join(self.run_dir, name)) as f:
                        first = f.readline().strip()
                        if first.isdigit():
                            out.append(int(first))
        except OSError:
            pass
        return out

    def snapshot(self):
        return (time.monotonic(), machine_busy_ticks(), process_ticks(os.getpid()),
                {pid: process_ticks(pid) for pid in self.pids()})

    async def run(self):
        prev = self.snapshot()
        try:
            while True:
                await asyncio.sleep(1)
                cur = self.snapshot()
                if prev[1] is not None and cur[1] is not None:
                    self.machine += cur[1] - prev[1]
                    self.driver += (cur[2] or 0) - (prev[2] or 0)
                    for pid, t in cur[3].items():
                        if t is not None and prev[3].get(pid) is not None:
                            self.cluster += t - prev[3][pid]
                    self.seconds += cur[0] - prev[0]
                prev = cur
        except asyncio.CancelledError:
            pass

    def report(self):
        if not self.seconds:
            return "cpu: not measured (no /proc)"
        cores = lambda ticks: ticks / CLK_TCK / self.seconds  # noqa: E731
        other = self.machine - self.cluster - self.driver
        return (f"cpu during the load ({os.cpu_count()} cores): machine busy {cores(self.machine):.2f} cores = "
                f"cluster (nodes + service) {cores(self.cluster):.2f} + this driver {cores(self.driver):.2f} "
                f"+ other processes {cores(other):.2f}")


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def fmt_ms(v):
    return "-" if v != v else f"{v * 1000:.0f}"  # v != v: NaN


class Run:
    def __init__(self, args):
        self.args = args
        self.ingresses = args.ingress
        self.t0 = None
        # One record per request: [id, ingress index, start, end, outcome, chargeId]
        # outcome: HTTP status (int) or an error kind (str).
        self.records = []
        self.events = []  # (t, command, rc)
        self.error_samples = {}  # outcome -> (t, ingress, first bytes of the body)
        self.stop_at = None
        self.ended = 0.0

    def now(self):
        return time.monotonic() - self.t0

    async def worker(self, idx, w):
        url = urlsplit(self.ingresses[idx])
        conn = Conn(url.hostname, url.port or 80)
        n = 0
        while self.now() < self.stop_at:
            n += 1
            pid = f"{self.args.prefix}-{idx + 1}-{w}-{n}"
            path = f"/PaymentService/{pid}/CreatePayment"
            start = self.now()
            charge = None
            try:
                status, data = await asyncio.wait_for(conn.request(path, CREATE_BODY), self.args.timeout)
                outcome = status
                if status != 200 and status not in self.error_samples:
                    self.error_samples[status] = (self.now(), idx + 1, data[:300].decode(errors="replace"))
                if status == 200:
                    try:
                        reply = json.loads(data)
                        charge = reply.get("chargeId")
                        if reply.get("status") != "completed":
                            outcome = f"200-{reply.get('status')}"
                    except ValueError:
                        outcome = "200-bad-json"
            except asyncio.TimeoutError:
                await conn.close()
                outcome = "timeout"
            except HttpError as e:
                outcome = e.kind
            end = self.now()
            self.records.append([pid, idx, start, end, outcome, charge])
            if outcome != 200:
                # Do not spin on a dead ingress: a short pause, as a client would.
                await asyncio.sleep(self.args.error_pause)
        await conn.close()

    async def run_event(self, at, command):
        await asyncio.sleep(max(0.0, at - self.now()))
        started = self.now()
        proc = await asyncio.create_subprocess_shell(
            command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        done = self.now()
        self.events.append((started, done, command, proc.returncode))
        print(f"[load] t={started:6.2f}s..{done:.2f}s  {command}  (exit {proc.returncode})", file=sys.stderr)
        if proc.returncode != 0:
            sys.stderr.write(err.decode(errors="replace"))

    async def drive(self):
        self.t0 = time.monotonic()
        self.stop_at = self.args.duration
        tasks = [
            asyncio.create_task(self.worker(i, w))
            for i in range(len(self.ingresses))
            for w in range(self.args.concurrency)
        ]
        events = [asyncio.create_task(self.run_event(at, cmd)) for at, cmd in self.args.event]
        progress = asyncio.create_task(self.progress())
        self.cpu = CpuSampler(self.args.run_dir)
        sampler = asyncio.create_task(self.cpu.run())
        await asyncio.gather(*tasks)
        progress.cancel()
        sampler.cancel()
        await sampler
        await asyncio.gather(*events)
        self.ended = self.now()

    async def progress(self):
        last = 0
        while True:
            await asyncio.sleep(5)
            n = len(self.records)
            ok = sum(1 for r in self.records[last:] if r[4] == 200)
            print(
                f"[load] t={self.now():5.1f}s  {n} requests answered, {ok / 5:.0f} ok/s in the last 5 s",
                file=sys.stderr,
            )
            last = n

    # --- verification -------------------------------------------------------------
    async def verify(self):
        """GetPayment for every ID tried, through --verify-ingress (default: the first).
        Returns None if that ingress does not serve requests within --verify-wait."""
        url = urlsplit(self.args.verify_ingress or self.ingresses[0])
        probe = Conn(url.hostname, url.port or 80)
        deadline = time.monotonic() + self.args.verify_wait
        while True:
            try:
                status, body = await asyncio.wait_for(
                    probe.request("/PaymentService/verify-probe/GetPayment", b"{}"), 10
                )
                if status == 404 and b"verify-probe not found" in body:
                    break
            except (asyncio.TimeoutError, HttpError):
                await probe.close()
            if time.monotonic() > deadline:
                print(f"[load] {url.geturl()} does not serve requests after {self.args.verify_wait}s; "
                      "no verification", file=sys.stderr)
                return None
            await asyncio.sleep(0.5)
        await probe.close()
        queue = asyncio.Queue()
        for r in self.records:
            queue.put_nowait(r)
        found = {}

        async def checker():
            conn = Conn(url.hostname, url.port or 80)
            while True:
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                for _attempt in range(10):
                    try:
                        status, data = await asyncio.wait_for(
                            conn.request(f"/PaymentService/{r[0]}/GetPayment", b"{}"), 30
                        )
                        if status == 200:
                            p = json.loads(data)
                            found[r[0]] = (p.get("status"), p.get("chargeId"))
                        elif status == 404 and b'"source":"ingress"' in data.replace(b" ", b""):
                            # The ingress itself does not know the service yet (a node
                            # just restarted): not an answer about the payment.
                            await asyncio.sleep(0.5)
                            continue
                        elif status == 404:
                            found[r[0]] = ("absent", None)
                        else:
                            found[r[0]] = (f"http-{status}", None)
                        break
                    except (asyncio.TimeoutError, HttpError):
                        await conn.close()
                        await asyncio.sleep(0.5)
                else:
                    found[r[0]] = ("unreachable", None)
            await conn.close()

        await asyncio.gather(*(checker() for _ in range(self.args.verify_concurrency)))
        return found


def analyse(run, found, ledger_path):
    args = run.args
    recs = run.records
    names = [f"ingress {i + 1} ({u})" for i, u in enumerate(run.ingresses)]
    out = []
    p = out.append

    # --- phases -------------------------------------------------------------------
    cuts = [0.0] + [e[1] for e in sorted(run.events)] + [max(run.ended, args.duration)]
    labels = ["start"] + [e[2].split("/")[-1] for e in sorted(run.events)]
    p(f"requests: {len(recs)}, duration {args.duration}s, {args.concurrency} workers per ingress, "
      f"{len(run.ingresses)} ingress(es), timeout {args.timeout}s")
    p(run.cpu.report())
    p("")
    p("per phase (requests by start time; latency of answered requests, ms):")
    p(f"{'phase':34} {'ingress':>7} {'ok':>7} {'errors':>7} {'ok/s':>7} {'p50':>6} {'p99':>6} {'max':>7}  errors by kind")
    for k in range(len(cuts) - 1):
        a, b = cuts[k], cuts[k + 1]
        label = f"{a:5.1f}-{b:5.1f}s after {labels[k]}"[:34]
        rows = [(None, [r for r in recs if a <= r[2] < b])]
        rows += [(i, [r for r in rows[0][1] if r[1] == i]) for i in range(len(run.ingresses))]
        for i, rs in rows:
            ok = [r for r in rs if r[4] == 200]
            errs = Counter(str(r[4]) for r in rs if r[4] != 200)
            lat = sorted(r[3] - r[2] for r in ok)
            span = max(1e-9, b - a)
            p(f"{label if i is None else '':34} {'all' if i is None else i + 1:>7} {len(ok):>7} "
              f"{sum(errs.values()):>7} {len(ok) / span:>7.0f} {fmt_ms(percentile(lat, .5)):>6} "
              f"{fmt_ms(percentile(lat, .99)):>6} {fmt_ms(lat[-1] if lat else float('nan')):>7}  "
              f"{dict(errs) if errs else ''}")
    p("")

    # --- per 10 s, all ingresses ------------------------------------------------------
    p("per 10 s (requests by start time, all ingresses; latency of 200s, ms):")
    p(f"{'window':>10} {'ok/s':>6} {'errors':>7} {'p50':>6} {'p99':>6} {'max':>7}")
    end = max(run.ended, args.duration)
    w = 0.0
    while w < end:
        rs = [r for r in recs if w <= r[2] < w + 10]
        lat = sorted(r[3] - r[2] for r in rs if r[4] == 200)
        p(f"{w:4.0f}-{w + 10:3.0f}s {len(lat) / 10:6.0f} {len(rs) - len(lat):7} "
          f"{fmt_ms(percentile(lat, .5)):>6} {fmt_ms(percentile(lat, .99)):>6} "
          f"{fmt_ms(lat[-1] if lat else float('nan')):>7}")
        w += 10
    p("")

    # --- per-second timeline ------------------------------------------------------
    p("timeline (by completion second; per ingress: ok/errors p99 ms):")
    secs = int(max(r[3] for r in recs)) + 1 if recs else 0
    grid = defaultdict(lambda: [0, 0, []])
    for r in recs:
        cell = grid[(int(r[3]), r[1])]
        if r[4] == 200:
            cell[0] += 1
            cell[2].append(r[3] - r[2])
        else:
            cell[1] += 1
    ev_by_sec = defaultdict(list)
    for e in run.events:
        ev_by_sec[int(e[1])].append(e[2].split("/")[-1])
    p("   t  " + "  ".join(f"{'ingress ' + str(i + 1):>20}" for i in range(len(run.ingresses))))
    for s in range(secs):
        cells = []
        for i in range(len(run.ingresses)):
            ok, err, lat = grid[(s, i)]
            lat.sort()
            cells.append(f"{ok:>5}/{err:<4} p99 {fmt_ms(percentile(lat, .99)):>5}")
        p(f"{s:4}  " + "  ".join(f"{c:>20}" for c in cells) + (f"   <- {', '.join(ev_by_sec[s])}" if s in ev_by_sec else ""))
    p("")

    # --- outages per ingress --------------------------------------------------------
    p("per ingress: failures and the longest time without a successful answer:")
    for i in range(len(run.ingresses)):
        rs = sorted((r for r in recs if r[1] == i), key=lambda r: r[3])
        errs = [r for r in rs if r[4] != 200]
        oks = [r[3] for r in rs if r[4] == 200]
        gap, gap_at, prev = 0.0, 0.0, 0.0
        for t in oks + [run.ended]:
            if t - prev > gap:
                gap, gap_at = t - prev, prev
            prev = t
        slowest = max((r[3] - r[2] for r in rs if r[4] == 200), default=0.0)
        if errs:
            p(f"  {names[i]}: {len(errs)} failed requests, from t={min(r[2] for r in errs):.2f}s to "
              f"t={max(r[3] for r in errs):.2f}s {dict(Counter(str(r[4]) for r in errs))}; "
              f"longest gap without a 200: {gap:.2f}s from t={gap_at:.2f}s; slowest 200: {slowest * 1000:.0f} ms")
        else:
            p(f"  {names[i]}: no failures; longest gap without a 200: {gap:.2f}s from t={gap_at:.2f}s; "
              f"slowest 200: {slowest * 1000:.0f} ms")
    for kind, (t, ing, body) in sorted(run.error_samples.items(), key=lambda kv: str(kv[0])):
        p(f"  first HTTP {kind} (t={t:.2f}s, ingress {ing}): {body}")
    # Requests in flight across each event: started before it, answered after it.
    for e in sorted(run.events):
        inflight = [r for r in recs if r[2] < e[0] and r[3] > e[1]]
        c = Counter("200" if r[4] == 200 else str(r[4]) for r in inflight)
        lat = sorted(r[3] - r[2] for r in inflight)
        p(f"  in flight across '{e[2]}' (t={e[0]:.2f}s): {len(inflight)} requests, outcomes {dict(c)}"
          + (f", answered after up to {lat[-1]:.2f}s" if lat else ""))
    p("")

    # --- verification ---------------------------------------------------------------
    problems = 0
    if found is not None:
        acked = [r for r in recs if r[4] == 200]
        lost = [r for r in acked if found.get(r[0], ("?",))[0] != "completed"]
        changed = [r for r in acked if found.get(r[0], (None, None))[1] != r[5]]
        others = [r for r in recs if r[4] != 200]
        fate = Counter(found.get(r[0], ("?",))[0] for r in others)
        half = [r for r in others if found.get(r[0], ("?",))[0] not in ("completed", "absent")]
        p("verification (GetPayment of every ID tried, after the run):")
        p(f"  acknowledged (200): {len(acked)}; present and completed: {len(acked) - len(lost)}; "
          f"LOST: {len(lost)}; chargeId differs: {len(changed)}")
        p(f"  not acknowledged (errors, timeouts): {len(others)}; now {dict(fate) if fate else '{}'}; "
          f"neither completed nor absent: {len(half)}")
        for r in (lost + changed + half)[:10]:
            p(f"    {r[0]}: answered {r[4]}, now {found.get(r[0])}")
        problems += len(lost) + len(changed) + len(half)
    if ledger_path:
        charges = Counter()
        with open(ledger_path) as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if (e.get("idempotencyKey", "").startswith(f"charge:{args.prefix}-")
                        and e.get("outcome") == "succeeded" and not e.get("replay")):
                    charges[e["paymentId"]] += 1
        doubles = [k for k, v in charges.items() if v > 1]
        acked_ids = {r[0] for r in recs if r[4] == 200}
        uncharged = [k for k in acked_ids if charges.get(k, 0) == 0]
        p(f"gateway ledger: {sum(charges.values())} charges for {len(charges)} payments of this run; "
          f"charged twice: {len(doubles)}; acknowledged but never charged: {len(uncharged)}")
        problems += len(doubles) + len(uncharged)
    return out, problems


def parse_event(text):
    at, sep, cmd = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("an event is SECONDS=COMMAND")
    return float(at), cmd


def default_ingresses():
    ports = os.environ.get("INGRESS_PORTS", "21080 22080 23080").split()
    return [f"http://127.0.0.1:{p}" for p in ports]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ingress", action="append", help="ingress URL (repeat; default: the cluster's three)")
    ap.add_argument("-c", "--concurrency", type=int, default=16, help="workers per ingress [16]")
    ap.add_argument("-d", "--duration", type=float, default=30, help="seconds of load [30]")
    ap.add_argument("--timeout", type=float, default=60, help="per-request timeout, seconds [60]")
    ap.add_argument("--error-pause", type=float, default=0.1,
                    help="seconds a worker waits after a failed request [0.1]")
    ap.add_argument("--event", action="append", type=parse_event, default=[],
                    help="SECONDS=COMMAND: run a shell command at that time (repeat)")
    ap.add_argument("--prefix", default=None, help="payment ID prefix [load-<random>]")
    ap.add_argument("--no-verify", action="store_true", help="skip the GetPayment check")
    ap.add_argument("--verify-ingress", help="ingress for the check [the first]")
    ap.add_argument("--verify-concurrency", type=int, default=32)
    ap.add_argument("--verify-delay", type=float, default=2,
                    help="seconds to wait before the check (invocations finishing) [2]")
    ap.add_argument("--verify-wait", type=float, default=120,
                    help="seconds to wait for the check's ingress to serve requests [120]")
    ap.add_argument("--ledger", help="gateway ledger (JSONL) to check for double charges")
    ap.add_argument("--run-dir", default=os.path.join(os.environ.get("CLUSTER_DIR", ".cluster"), "run"),
                    help="pid files of the cluster's processes, for the CPU figures [$CLUSTER_DIR/run]")
    ap.add_argument("--out", help="write every request (JSONL) and the report here (a folder)")
    args = ap.parse_args()
    args.ingress = args.ingress or default_ingresses()
    args.prefix = args.prefix or f"load-{uuid.uuid4().hex[:8]}"

    run = Run(args)
    print(f"[load] {len(args.ingress)} ingress(es) x {args.concurrency} workers, {args.duration}s, "
          f"IDs {args.prefix}-*", file=sys.stderr)
    asyncio.run(run.drive())
    found = None
    if not args.no_verify:
        time.sleep(args.verify_delay)
        print(f"[load] checking {len(run.records)} payment IDs with GetPayment", file=sys.stderr)
        found = asyncio.run(run.verify())
    report, problems = analyse(run, found, args.ledger)
    if not args.no_verify and found is None:
        report.append("verification: NOT DONE (the ingress did not serve requests)")
        problems += 1
    text = "\n".join(report)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "requests.jsonl"), "w") as f:
            for r in run.records:
                f.write(json.dumps({"id": r[0], "ingress": r[1] + 1, "start": round(r[2], 4),
                                    "end": round(r[3], 4), "outcome": r[4], "chargeId": r[5],
                                    "now": found.get(r[0]) if found else None}) + "\n")
        with open(os.path.join(args.out, "report.txt"), "w") as f:
            f.write(" ".join(sys.argv) + "\n\n" + text + "\n")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
