// Reconnect backoff: exponential, with jitter, reset after a connection that stayed open.
// Delays are checked against their bounds and lower bounds only: a busy machine makes
// timers late, never early.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { RingSocket } from "../ringsocket.js";
import { Recorder, freePort, recordEvents, startProxy, startServer, wiredWebSocket, within } from "../harness.mjs";

const MIN = 20;
const MAX = 320;
// The documented range of attempt n: [max(MIN, hi/2), hi], hi = min(MAX, MIN * 2^n).
function range(n) {
  const hi = Math.min(MAX, MIN * 2 ** n);
  return [Math.max(MIN, hi / 2), hi];
}

let server;
const cleanups = [];

before(async () => {
  server = await startServer();
});

after(async () => {
  for (const fn of cleanups) await fn();
  await server?.stop();
});

describe("backoff", { timeout: 90_000 }, () => {
  test("against a closed port: delays grow, randomized within their bounds, and are waited", async () => {
    const port = await freePort(); // closed: every attempt is refused
    const wired = wiredWebSocket();
    const rs = new RingSocket(`ws://127.0.0.1:${port}/v1`, {
      WebSocket: wired.WebSocket,
      minReconnectDelay: MIN,
      maxReconnectDelay: MAX,
    });
    cleanups.push(() => rs.close());
    const scheduled = new Recorder();
    rs.on("reconnecting", (e) => scheduled.push({ ...e, at: performance.now() }));
    const ATTEMPTS = 9;
    await scheduled.count(ATTEMPTS + 1, `${ATTEMPTS + 1} reconnect attempts scheduled`);
    rs.close();
    const events = scheduled.items.slice(0, ATTEMPTS + 1);

    assert.deepEqual(events.map((e) => e.attempt), [...Array(ATTEMPTS + 1).keys()].map((i) => i + 1));
    for (const { attempt, delay } of events) {
      const [lo, hi] = range(attempt);
      assert.ok(delay >= Math.floor(lo) && delay <= Math.ceil(hi), `attempt ${attempt}: ${delay} ms within [${lo}, ${hi}]`);
    }
    const delays = events.map((e) => e.delay);
    for (let i = 1; i < delays.length; i++) {
      assert.ok(delays[i] >= delays[i - 1] || range(i)[1] === MAX, `delays never shrink before the cap: ${delays}`);
    }
    assert.ok(delays.at(-1) >= MAX / 2, "the cap is reached");
    // Jitter: the capped attempts (n >= 4: [160, 320]) are random, not one fixed value,
    // and the whole sequence is not the deterministic lower bounds.
    const capped = delays.slice(3);
    assert.ok(new Set(capped).size >= 2, `capped delays vary: ${capped}`);
    assert.ok(delays.some((d, i) => d !== range(i + 1)[0]), `not all at their lower bound: ${delays}`);

    // Attempt n+1 (socket n+2: the first is the initial connect) is opened no sooner
    // than its delay after it was scheduled.
    for (let i = 0; i < ATTEMPTS; i++) {
      const opened = wired.urls[i + 1].at;
      const waited = opened - events[i].at;
      assert.ok(waited >= events[i].delay - 2, `attempt ${i + 1}: waited ${waited.toFixed(1)} ms for a ${events[i].delay} ms delay`);
    }
    assert.equal(rs.state, "closed");
  });

  async function cycles(resetBackoffAfter) {
    const proxy = await startProxy(server.port);
    const rs = new RingSocket(proxy.wsUrl, {
      WebSocket: wiredWebSocket().WebSocket,
      minReconnectDelay: MIN,
      maxReconnectDelay: MAX,
      resetBackoffAfter,
    });
    cleanups.push(async () => {
      rs.close();
      await proxy.close();
    });
    const events = recordEvents(rs, ["state", "reconnecting"]);
    const opens = (n) => events.wait((items) => items.filter((e) => e.name === "state" && e.value === "open").length >= n, `open #${n}`);
    const attempts = () => events.of("reconnecting").map((e) => e.attempt);
    const firstAfter = [];
    for (let round = 1; round <= 2; round++) {
      await opens(round);
      const before = attempts().length;
      proxy.cut(); // drops the connection and refuses the next two attempts
      await events.wait(() => attempts().length >= before + 3, "three attempts while cut");
      firstAfter.push(attempts()[before]);
      proxy.restore();
    }
    await opens(3);
    rs.close();
    return { firstAfter, attempts: attempts() };
  }

  test("a connection that stayed open resets the backoff", async () => {
    const { firstAfter, attempts } = await within(cycles(0), "two cut-and-restore rounds");
    assert.deepEqual(firstAfter, [1, 1], `each drop after an open starts over: ${attempts}`);
  });

  test("a connection shorter than resetBackoffAfter does not reset it", async () => {
    const { firstAfter, attempts } = await within(cycles(60_000), "two cut-and-restore rounds");
    assert.equal(firstAfter[0], 1);
    assert.ok(firstAfter[1] > 3, `the second round goes on counting: ${attempts}`);
  });
});
