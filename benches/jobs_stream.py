#!/usr/bin/env python3
"""A steady stream of job requests for the background-task benchmark (issue #5).

POSTs to http://ADDR/job (or /job?inline=1) at RATE requests per second on one
keep-alive connection, on a fixed schedule (a late request does not shift the next
ones), for DURATION seconds, then prints how many were answered, by status.

    python3 benches/jobs_stream.py 127.0.0.1:9001 --rate 20 --duration 14 [--inline]
"""

import argparse
import collections
import http.client
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("addr")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=14.0)
    parser.add_argument("--inline", action="store_true")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)
    path = "/job?inline=1" if args.inline else "/job"
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    statuses = collections.Counter()
    start = time.monotonic()
    n = 0
    while True:
        due = start + n / args.rate
        if due - start >= args.duration:
            break
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        conn.request("POST", path, body=b"", headers={"Content-Length": "0"})
        response = conn.getresponse()
        response.read()
        statuses[response.status] += 1
        n += 1
    elapsed = time.monotonic() - start
    print(f"{n} job requests in {elapsed:.1f} s ({n / elapsed:.1f}/s): {dict(statuses)}")


if __name__ == "__main__":
    main()
