#!/usr/bin/env python3
"""Abuse controls at the edge, measured (issue 15): ours only, release build.

1. Server CPU per refused connection (STARTTLS listener, client in a 100,000-entry deny
   file: greeting 554, close) against CPU per full TLS handshake (bench.py's method).
2. The same refusal with a 1-entry deny file: the difference is the cost of looking an
   address up among 100,000 ranges.
3. Handshake latency of a well-behaved client (loadgen latency, 127.0.0.1) with and without
   a TLS ClientHello flood from another address (127.0.0.3) at about 10x its
   limits.per_ip_rate, which refuses the flood before any handshake.

Server CPU is utime+stime from /proc over a fixed number of operations, as in bench.py.
Writes bench/EDGE.md.

    bench/run --help     (builds target/release/{smtp-tls-proxy,loadgen} first)
    python3 bench/edge.py [--refusals 5000] [--rounds 3]
"""
import argparse
import ipaddress
import os
import random
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

RATE = 100  # per second, per address, on the measured implicit listener


class Edge(bench.Ours):
    name = "smtp-tls-proxy"

    def __init__(self, d, sink, deny_file):
        super().__init__(d, sink)
        self.deny_file = deny_file

    def command(self):
        p, d = self.ports, self.d
        cfg = self.write("edge.yaml", f"""
log: {{ format: text, level: warn }}
deny_file: {self.deny_file}
upstreams:
  sink: {{ address: "127.0.0.1:{self.sink}", proxy_protocol: v2, health_interval: 1h }}
certificates:
  - {{ cert: {d}/ecdsa.crt, key: {d}/ecdsa.key }}
listeners:
  ecdsa: {{ listen: "127.0.0.1:{p['ecdsa']}", mode: implicit, hostname: {bench.ECDSA_NAME}, upstream: sink,
           limits: {{ per_ip: 20000 }} }}
  limited: {{ listen: "127.0.0.1:{p['rsa']}", mode: implicit, hostname: {bench.ECDSA_NAME}, upstream: sink,
             limits: {{ per_ip: 20000, per_ip_rate: "{RATE}/1s" }} }}
  starttls: {{ listen: "127.0.0.1:{p['starttls']}", mode: starttls, hostname: {bench.ECDSA_NAME}, upstream: sink,
              limits: {{ per_ip: 20000 }} }}
""")
        return [bench.PROXY, "--config", cfg]

    def ports_used(self):
        return ["ecdsa", "rsa", "starttls"]


def deny_file(path, n, include):
    rnd = random.Random(7)
    with open(path, "w") as f:
        f.write("# bench deny list\n")
        for _ in range(n - 1):
            f.write(f"{ipaddress.IPv4Address(rnd.randrange(1 << 24, 0xDF000000))}\n")
        f.write(f"{include}\n")


def refuse(port, n, src="127.0.0.2"):
    for _ in range(n):
        s = socket.socket()
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        got = s.recv(256)
        assert got.startswith(b"554 5.7.1"), got
        s.close()


def wait_denied(port):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.connect(("127.0.0.1", port))
        got = s.recv(256)
        s.close()
        if got.startswith(b"554"):
            return
        time.sleep(0.2)
    raise RuntimeError("deny file never applied")


FLOOD_THREADS = 2


def flood(port, stop, count):
    """One address at 10x per_ip_rate, paced (not flat out: a flat-out Python client
    would take the CPU the proxy and the measured clients share on a small machine)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    interval = FLOOD_THREADS / (10 * RATE)
    due = time.monotonic()
    while not stop.is_set():
        due += interval
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        try:
            s = socket.socket()
            s.bind(("127.0.0.3", 0))
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
            try:
                ctx.wrap_socket(s, server_hostname=bench.ECDSA_NAME).close()
            except (ssl.SSLError, OSError):
                pass
            count[0] += 1
        except OSError:
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--refusals", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--handshakes", type=int, default=2000)
    ap.add_argument("--latency", type=int, default=100)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="smtp-tls-proxy-edge-")
    bench.make_certs(d)
    sink, sink_port = bench.start_sink()
    big, small = os.path.join(d, "deny-100k"), os.path.join(d, "deny-1")
    deny_file(big, 100_000, "127.0.0.2")
    deny_file(small, 1, "127.0.0.2")
    res = {}

    def add(k, v):
        res.setdefault(k, []).append(v)

    try:
        for rnd in range(a.rounds):
            for kind, path in (("100k", big), ("1", small)):
                c = Edge(d, sink_port, path)
                c.start()
                try:
                    print(f"round {rnd + 1}/{a.rounds}: deny file {kind}", file=sys.stderr, flush=True)
                    wait_denied(c.ports["starttls"])
                    refuse(c.ports["starttls"], 100)
                    before = bench.cpu_seconds(c.proc.pid)
                    refuse(c.ports["starttls"], a.refusals)
                    add(f"refused_{kind}", (bench.cpu_seconds(c.proc.pid) - before) * 1e6 / a.refusals)
                    if kind == "100k":
                        bench.m_handshakes(c, "ecdsa", 50)
                        add("handshake", bench.m_handshakes(c, "ecdsa", a.handshakes)["server_us"])
                        def latency():
                            r, _ = bench.loadgen("latency", "--addr", f"127.0.0.1:{c.ports['rsa']}",
                                                 "--sni", bench.ECDSA_NAME, "--n", a.latency)
                            return r["median_us"]
                        add("lat_quiet", latency())
                        stop, count = threading.Event(), [0]
                        threads = [threading.Thread(target=flood, args=(c.ports["rsa"], stop, count)) for _ in range(FLOOD_THREADS)]
                        for t in threads:
                            t.start()
                        time.sleep(1.1)
                        t0, n0 = time.monotonic(), count[0]
                        time.sleep(1.1)  # the latency client's bucket refills
                        add("lat_flood", latency())
                        add("flood_rate", (count[0] - n0) / (time.monotonic() - t0))
                        stop.set()
                        for t in threads:
                            t.join()
                finally:
                    c.stop()
    finally:
        sink.terminate()
    med = {k: statistics.median(v) for k, v in res.items()}
    lines = [
        "# Abuse controls at the edge, measured",
        "",
        f"Generated by `bench/edge.py` (ours only, release build; {a.rounds} rounds, medians; "
        f"{a.refusals} refused connections, {a.handshakes} handshakes, {a.latency} latency samples per round).",
        "",
        "| measurement | median | rounds |",
        "|---|---|---|",
        f"| CPU per refused connection, deny file of 100,000 entries (µs) | {med['refused_100k']:.0f} | {', '.join(f'{v:.0f}' for v in res['refused_100k'])} |",
        f"| CPU per refused connection, deny file of 1 entry (µs) | {med['refused_1']:.0f} | {', '.join(f'{v:.0f}' for v in res['refused_1'])} |",
        f"| CPU per full TLS handshake, ECDSA (µs) | {med['handshake']:.0f} | {', '.join(f'{v:.0f}' for v in res['handshake'])} |",
        f"| refused / handshake | {med['refused_100k'] / med['handshake']:.2f} | |",
        f"| connect → greeting, median, quiet (µs) | {med['lat_quiet']:.0f} | {', '.join(f'{v:.0f}' for v in res['lat_quiet'])} |",
        f"| connect → greeting, median, under a one-address flood (µs) | {med['lat_flood']:.0f} | {', '.join(f'{v:.0f}' for v in res['lat_flood'])} |",
        f"| flood rate (ClientHello attempts/s; per_ip_rate is {RATE}/s) | {med['flood_rate']:.0f} | {', '.join(f'{v:.0f}' for v in res['flood_rate'])} |",
        "",
    ]
    out = os.path.join(bench.ROOT, "bench", "EDGE.md")
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
