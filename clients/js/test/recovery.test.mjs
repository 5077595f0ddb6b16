// Reconnect and recovery: a TCP proxy between client and server is cut while
// publications go on over HTTP; the client must get exactly what it missed.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { RingSocket } from "../ringsocket.js";
import {
  Recorder,
  WebSocket,
  httpHistory,
  httpPublish,
  recordEvents,
  startProxy,
  startServer,
  wiredWebSocket,
  within,
} from "../harness.mjs";

let server;
let small; // history_size = 5
const cleanups = [];

before(async () => {
  [server, small] = await Promise.all([startServer(), startServer({ settings: { history_size: 5 } })]);
});

after(async () => {
  for (const fn of cleanups.reverse()) await fn();
  await Promise.all([server?.stop(), small?.stop()]);
});

async function setup(target, options = {}) {
  const proxy = await startProxy(target.port);
  const rs = new RingSocket(proxy.wsUrl, { WebSocket, minReconnectDelay: 20, maxReconnectDelay: 200, ...options });
  cleanups.push(async () => {
    rs.close();
    await proxy.close();
  });
  const events = recordEvents(rs);
  return { proxy, rs, events };
}

function states(events) {
  return events.of("state");
}

// Cuts the proxy and waits until the client knows.
async function cut(proxy, events) {
  const opens = states(events).filter((s) => s === "open").length;
  proxy.cut();
  await events.wait(
    (items) => {
      const s = items.filter((e) => e.name === "state").map((e) => e.value);
      return s.filter((x) => x === "open").length === opens && s.at(-1) === "connecting";
    },
    "state connecting after the cut",
  );
}

// Waits until the server's history holds the topic's publications up to `offset`.
async function historyReaches(target, topic, offset) {
  const h = await httpHistory(target, topic, 0);
  assert.equal(h.offset, offset, `GET /history/${topic}: the last offset`);
  return h;
}

describe("recovery", { timeout: 90_000 }, () => {
  test("missed publications arrive in order, no gap, no duplicate; state events in order", async () => {
    const { proxy, rs, events } = await setup(server);
    const got = new Recorder();
    const sub = rs.subscribe("rec-lobby", (m) => got.push(m));
    const ready = await within(sub.ready, "sub.ready");
    for (const n of [1, 2]) await httpPublish(server, "rec-lobby", JSON.stringify({ n }));
    await got.count(2, "the two live publications");

    await cut(proxy, events);
    for (const n of [3, 4, 5, 6, 7]) await httpPublish(server, "rec-lobby", JSON.stringify({ n }));
    await historyReaches(server, "rec-lobby", 7);
    proxy.restore();

    const again = await events.waitFor("subscribed", (s) => s.resubscribed, "the resubscription");
    assert.deepEqual(again, {
      topic: "rec-lobby",
      recovered: true,
      missed: 5,
      offset: 7,
      epoch: ready.epoch,
      conflated: false,
      resubscribed: true,
    });
    await got.count(7, "all seven");
    await httpPublish(server, "rec-lobby", JSON.stringify({ n: 8 }));
    await got.count(8, "the live one after recovery");
    assert.deepEqual(got.items.map((m) => m.offset), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.deepEqual(got.items.map((m) => m.data.n), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.ok(got.items.every((m) => m.epoch === ready.epoch));
    assert.equal(events.of("subscribed").length, 2, "one subscribe, one resubscribe");

    rs.close();
    assert.deepEqual(states(events), ["connecting", "open", "connecting", "open", "closed"]);
    assert.equal(rs.state, "closed");
  });

  test("the resubscribe carries since = the last publication handled", async () => {
    const wired = wiredWebSocket();
    const { proxy, rs, events } = await setup(server, { WebSocket: wired.WebSocket });
    const got = new Recorder();
    const quiet = new Recorder();
    rs.subscribe("rec-since", (m) => got.push(m));
    const quietSub = rs.subscribe("rec-quiet", (m) => quiet.push(m));
    const { epoch: quietEpoch, offset: quietOffset } = await within(quietSub.ready, "quiet ready");
    for (const n of [1, 2, 3]) await httpPublish(server, "rec-since", String(n));
    const [, , third] = await got.count(3, "three");

    await cut(proxy, events);
    proxy.restore();
    await events.waitFor("subscribed", (s) => s.resubscribed && s.topic === "rec-quiet", "the resubscription of rec-quiet");
    await events.waitFor("subscribed", (s) => s.resubscribed && s.topic === "rec-since", "the resubscription of rec-since");
    const last = wired.sockets.length; // the socket that reconnected
    const resubs = wired.wire.items.filter((w) => w.dir === "out" && w.socket === last && w.frame.type === "subscribe");
    assert.equal(resubs.length, 2);
    const byTopic = Object.fromEntries(resubs.map((w) => [w.frame.topic, w.frame.since]));
    assert.deepEqual(byTopic["rec-since"], { offset: 3, epoch: third.epoch });
    // A topic with nothing published resumes from its subscribed reply.
    assert.deepEqual(byTopic["rec-quiet"], { offset: quietOffset, epoch: quietEpoch });
    assert.equal(quiet.items.length, 0);
  });

  test("beyond the history: recovered false, and what the server still has", async () => {
    const { proxy, rs, events } = await setup(small);
    const got = new Recorder();
    const sub = rs.subscribe("rec-far", (m) => got.push(m));
    const ready = await within(sub.ready, "sub.ready");
    await httpPublish(small, "rec-far", "1");
    await got.count(1, "the first");

    await cut(proxy, events);
    for (let n = 2; n <= 9; n++) await httpPublish(small, "rec-far", String(n));
    const h = await historyReaches(small, "rec-far", 9);
    assert.equal(h.publications.length, 5, "history_size = 5");
    proxy.restore();

    const again = await events.waitFor("subscribed", (s) => s.resubscribed, "the resubscription");
    assert.equal(again.recovered, false);
    assert.equal(again.missed, 5, "offsets 5 to 9 are still kept");
    assert.equal(again.offset, 9);
    assert.equal(again.epoch, ready.epoch);
    await got.count(6, "the five still kept");
    assert.deepEqual(got.items.map((m) => m.offset), [1, 5, 6, 7, 8, 9]);

    // The gap 2..4 is accepted (recovered: false told the application); live ones go on.
    await httpPublish(small, "rec-far", "10");
    await got.count(7, "the live one");
    assert.equal(got.items[6].offset, 10);
    assert.equal(events.of("subscribed").length, 2, "no resubscription loop for the lost ones");
  });

  test("missing exactly history_size publications is still recovered", async () => {
    const { proxy, rs, events } = await setup(small);
    const got = new Recorder();
    const sub = rs.subscribe("rec-edge", (m) => got.push(m));
    await within(sub.ready, "sub.ready");
    await httpPublish(small, "rec-edge", "1");
    await got.count(1, "the first");
    await cut(proxy, events);
    for (let n = 2; n <= 6; n++) await httpPublish(small, "rec-edge", String(n));
    await historyReaches(small, "rec-edge", 6);
    proxy.restore();
    const again = await events.waitFor("subscribed", (s) => s.resubscribed, "the resubscription");
    assert.equal(again.recovered, true, "offsets 2 to 6 are the 5 kept");
    assert.equal(again.missed, 5);
    await got.count(6, "all six");
    assert.deepEqual(got.items.map((m) => m.offset), [1, 2, 3, 4, 5, 6]);
  });

  test("since with an epoch the topic does not have: recovered false, nothing replayed", async () => {
    for (const n of [1, 2, 3]) await httpPublish(server, "rec-epoch", String(n));
    const rs = new RingSocket(server.wsUrl, { WebSocket });
    cleanups.push(() => rs.close());
    const got = new Recorder();
    const sub = rs.subscribe("rec-epoch", (m) => got.push(m), { since: { offset: 1, epoch: "not-this-epoch" } });
    const ready = await within(sub.ready, "sub.ready");
    assert.equal(ready.recovered, false);
    assert.equal(ready.missed, 0);
    assert.equal(ready.offset, 3);
    assert.notEqual(ready.epoch, "not-this-epoch");
    await httpPublish(server, "rec-epoch", "4");
    await got.count(1, "the live one");
    assert.deepEqual(got.items.map((m) => [m.offset, m.data, m.epoch]), [[4, 4, ready.epoch]]);
  });

  test("a server restart: a new epoch, recovered false, offsets start over and are delivered", async () => {
    let restartable = await startServer();
    cleanups.push(() => restartable.stop());
    const rs = new RingSocket(restartable.wsUrl, { WebSocket, minReconnectDelay: 20, maxReconnectDelay: 200 });
    cleanups.push(() => rs.close());
    const events = recordEvents(rs);
    const got = new Recorder();
    const sub = rs.subscribe("rec-restart", (m) => got.push(m));
    await within(sub.ready, "sub.ready");
    for (const n of [1, 2, 3]) await httpPublish(restartable, "rec-restart", String(n));
    await got.count(3, "three before the restart");
    const oldEpoch = got.items[0].epoch;

    await restartable.stop();
    const bye = await events.waitFor("disconnect", () => true, "the disconnect");
    assert.equal(bye.code, 1001, "the server says it is going away");
    restartable = await startServer({ port: restartable.port });
    const again = await events.waitFor("subscribed", (s) => s.resubscribed, "the resubscription");
    assert.equal(again.recovered, false);
    assert.equal(again.missed, 0);
    assert.equal(again.offset, 0);
    assert.notEqual(again.epoch, oldEpoch, "history lost: a new epoch");

    await httpPublish(restartable, "rec-restart", '"after"');
    await got.count(4, "offset 1 of the new epoch, though 3 was the last handled");
    assert.deepEqual(got.items[3], { topic: "rec-restart", offset: 1, epoch: again.epoch, data: "after" });
    assert.equal(events.of("subscribed").length, 2);
  });

  test("a skipped offset on a topic that is not conflated is filled by resubscribing", async () => {
    // The WebSocket drops the publication at offset 3 once, as a lossy path would.
    let dropped = 0;
    const wired = wiredWebSocket({
      drop: (f) => f.type === "pub" && f.topic === "rec-gap" && f.offset === 3 && dropped++ === 0,
    });
    const { rs, events } = await setup(server, { WebSocket: wired.WebSocket });
    const got = new Recorder();
    const sub = rs.subscribe("rec-gap", (m) => got.push(m));
    await within(sub.ready, "sub.ready");
    for (const n of [1, 2, 3, 4, 5]) await httpPublish(server, "rec-gap", String(n));
    await got.count(5, "all five, the dropped one recovered");
    await httpPublish(server, "rec-gap", "6");
    await got.count(6, "a live one after");
    assert.deepEqual(got.items.map((m) => m.offset), [1, 2, 3, 4, 5, 6]);
    assert.equal(dropped, 2, "the offset-3 frame came twice: dropped, then the resent one let through");

    const out = wired.wire.items.filter((w) => w.dir === "out").map((w) => w.frame);
    const refill = out.filter((f) => f.topic === "rec-gap").slice(1);
    assert.equal(refill[0].type, "unsubscribe");
    assert.equal(refill[1].type, "subscribe");
    assert.equal(refill[1].since.offset, 2);
    const resub = events.of("subscribed").find((s) => s.resubscribed);
    assert.equal(resub.recovered, true);
    assert.ok(resub.missed >= 1);
    assert.equal(rs.state, "open", "filled on the same connection");
    assert.equal(wired.sockets.length, 1);
  });

  test("a publication that comes twice is handled once", async () => {
    const wired = wiredWebSocket({ repeat: (f) => f.type === "pub" && f.topic === "rec-dup" });
    const { rs, events } = await setup(server, { WebSocket: wired.WebSocket });
    const got = new Recorder();
    const sub = rs.subscribe("rec-dup", (m) => got.push(m));
    await within(sub.ready, "sub.ready");
    for (const n of [1, 2, 3]) await httpPublish(server, "rec-dup", String(n));
    const marker = new Recorder();
    await within(rs.subscribe("rec-dup-marker", (m) => marker.push(m)).ready, "marker ready");
    await httpPublish(server, "rec-dup-marker", "1");
    await marker.count(1, "the marker after the three");
    await got.count(3, "three");
    assert.deepEqual(got.items.map((m) => m.offset), [1, 2, 3]);
    assert.equal(events.of("subscribed").filter((s) => s.topic === "rec-dup").length, 1, "a duplicate is no gap");
  });

  test("publishes wait for the connection and go out after a reconnect", async () => {
    const { proxy, rs, events } = await setup(server);
    const got = new Recorder();
    const sub = rs.subscribe("rec-queue", (m) => got.push(m));
    await within(sub.ready, "sub.ready");
    await cut(proxy, events);
    const acks = [rs.publish("rec-queue", { q: 1 }), rs.publish("rec-queue", { q: 2 })];
    proxy.restore();
    const [a1, a2] = await within(Promise.all(acks), "the acks after the reconnect");
    assert.equal(a2.offset, a1.offset + 1);
    await got.count(2, "both");
    assert.deepEqual(got.items.map((m) => m.data.q), [1, 2]);
  });

  test("a conflated topic skips offsets by design: no resubscription", async () => {
    const conflating = await startServer({ settings: { conflate_topics: "conf:*", conflate_window_ms: 1000 } });
    cleanups.push(() => conflating.stop());
    const rs = new RingSocket(conflating.wsUrl, { WebSocket });
    cleanups.push(() => rs.close());
    const events = recordEvents(rs, ["subscribed"]);
    const got = new Recorder();
    const sub = rs.subscribe("conf:cursor", (m) => got.push(m));
    const ready = await within(sub.ready, "sub.ready");
    assert.equal(ready.conflated, true);
    // Within one window only the first and the latest go out.
    await Promise.all([1, 2, 3, 4, 5].map((n) => httpPublish(conflating, "conf:cursor", String(n))));
    await got.wait((items) => items.some((m) => m.offset === 5), "the latest value");
    const offsets = got.items.map((m) => m.offset);
    assert.ok(offsets.length < 5, `conflated: fewer than 5 delivered, got ${offsets}`);
    assert.deepEqual([...offsets].sort((x, y) => x - y), offsets, "in offset order");
    assert.equal(events.of("subscribed").length, 1, "skips on a conflated topic are not gaps");
  });
});
