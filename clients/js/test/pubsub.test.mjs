// Subscribe, publish and unsubscribe against a real `ringsocket serve`.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { RingSocket } from "../ringsocket.js";
import { CLIENT_DIR, Recorder, WebSocket, httpPublish, recordEvents, startServer, wiredWebSocket, within } from "../harness.mjs";

let server;
const clients = [];

function client(options = {}) {
  const rs = new RingSocket(server.wsUrl, { WebSocket, minReconnectDelay: 20, maxReconnectDelay: 200, ...options });
  clients.push(rs);
  return rs;
}

function collect(rs, topic) {
  const got = new Recorder();
  const sub = rs.subscribe(topic, (m) => got.push(m));
  return { sub, got };
}

before(async () => {
  server = await startServer();
});

after(async () => {
  for (const rs of clients) rs.close();
  await server?.stop();
});

describe("pubsub", { timeout: 60_000 }, () => {
  test("subscribe, then publish from another client: the ack and the publication agree", async () => {
    const a = client();
    const b = client();
    const { sub, got } = collect(a, "rt-lobby");
    const ready = await within(sub.ready, "sub.ready");
    assert.equal(ready.recovered, false);
    assert.equal(ready.missed, 0);
    assert.equal(ready.offset, 0, "a topic nobody published to starts at offset 0");
    assert.equal(typeof ready.epoch, "string");
    assert.equal(ready.conflated, false);

    const ack1 = await within(b.publish("rt-lobby", { text: "hi" }), "the first ack");
    const ack2 = await within(b.publish("rt-lobby", [1, "two", null]), "the second ack");
    assert.equal(ack1.offset, 1);
    assert.equal(ack2.offset, 2);
    assert.equal(ack1.epoch, ready.epoch);
    assert.equal(ack2.epoch, ready.epoch);

    await got.count(2, "two publications");
    assert.deepEqual(got.items, [
      { topic: "rt-lobby", offset: 1, epoch: ready.epoch, data: { text: "hi" } },
      { topic: "rt-lobby", offset: 2, epoch: ready.epoch, data: [1, "two", null] },
    ]);
    assert.equal(sub.offset, 2);
    assert.equal(sub.epoch, ready.epoch);
  });

  // docs/protocol.md: `publish` has `data` (any JSON value), null included.
  test(
    "publish null: null is a JSON value too",
    async () => {
      const a = client();
      const { sub, got } = collect(a, "rt-null");
      await within(sub.ready, "sub.ready");
      const ack = await within(a.publish("rt-null", null), "the ack");
      const [m] = await got.count(1, "the publication");
      assert.deepEqual(m, { topic: "rt-null", offset: ack.offset, epoch: ack.epoch, data: null });
    },
  );

  test("a client receives its own publication and its ack", async () => {
    const a = client();
    const { sub, got } = collect(a, "rt-self");
    await within(sub.ready, "sub.ready");
    const ack = await within(a.publish("rt-self", "just a string"), "the ack");
    const [m] = await got.count(1, "the own publication");
    assert.deepEqual(m, { topic: "rt-self", offset: ack.offset, epoch: ack.epoch, data: "just a string" });
    assert.equal(ack.topic, "rt-self");
  });

  test("POST /publish reaches a v1 subscriber with offset and epoch", async () => {
    const a = client();
    const { sub, got } = collect(a, "rt-http");
    const { epoch } = await within(sub.ready, "sub.ready");
    await httpPublish(server, "rt-http", JSON.stringify({ price: 42.5, tags: ["a"] }));
    await httpPublish(server, "rt-http", "plain text, not JSON");
    await httpPublish(server, "rt-http", Buffer.from([0, 1, 2, 250, 255]), { "content-type": "application/octet-stream" });
    await got.count(3, "three publications");
    assert.deepEqual(got.items[0], { topic: "rt-http", offset: 1, epoch, data: { price: 42.5, tags: ["a"] } });
    assert.deepEqual(got.items[1], { topic: "rt-http", offset: 2, epoch, data: "plain text, not JSON" });
    assert.deepEqual(got.items[2], {
      topic: "rt-http",
      offset: 3,
      epoch,
      data: Buffer.from([0, 1, 2, 250, 255]).toString("base64"),
      encoding: "base64",
    });
  });

  test("two topics on one connection, each to its own callback with its own offsets", async () => {
    const wired = wiredWebSocket();
    const a = client({ WebSocket: wired.WebSocket });
    const one = collect(a, "rt-one");
    const two = collect(a, "rt-two");
    await within(Promise.all([one.sub.ready, two.sub.ready]), "both ready");
    await httpPublish(server, "rt-one", '"1a"');
    await httpPublish(server, "rt-two", '"2a"');
    await httpPublish(server, "rt-one", '"1b"');
    await one.got.count(2, "two on rt-one");
    await two.got.count(1, "one on rt-two");
    assert.deepEqual(one.got.items.map((m) => [m.offset, m.data]), [[1, "1a"], [2, "1b"]]);
    assert.deepEqual(two.got.items.map((m) => [m.offset, m.data]), [[1, "2a"]]);
    assert.equal(wired.sockets.length, 1, "one WebSocket for both topics");
    const subscribes = wired.wire.items.filter((w) => w.dir === "out" && w.frame.type === "subscribe");
    assert.deepEqual(subscribes.map((w) => w.frame.topic), ["rt-one", "rt-two"]);
    assert.notEqual(subscribes[0].frame.id, subscribes[1].frame.id);
  });

  test("the subscribe frames on the wire: ids count up from 1, no since the first time", async () => {
    const wired = wiredWebSocket();
    const a = client({ WebSocket: wired.WebSocket });
    const { sub } = collect(a, "rt-wire");
    await within(sub.ready, "sub.ready");
    await within(a.publish("rt-wire", { n: 1 }), "the ack");
    const out = wired.wire.items.filter((w) => w.dir === "out").map((w) => w.frame);
    assert.deepEqual(out, [
      { id: 1, type: "subscribe", topic: "rt-wire" },
      { id: 2, type: "publish", topic: "rt-wire", data: { n: 1 } },
    ]);
    assert.equal(wired.sockets[0].protocol, "ringsocket.v1");
  });

  test("unsubscribe stops delivery at once and on the server", async () => {
    const wired = wiredWebSocket();
    const a = client({ WebSocket: wired.WebSocket });
    const gone = collect(a, "rt-gone");
    const kept = collect(a, "rt-kept");
    await within(Promise.all([gone.sub.ready, kept.sub.ready]), "both ready");
    await httpPublish(server, "rt-gone", '"before"');
    await gone.got.count(1, "the publication before unsubscribe");

    gone.sub.unsubscribe();
    assert.equal(gone.sub.active, false);
    // The server answers `unsubscribed`; from then on it sends nothing of that topic.
    await wired.wire.wait(
      (items) => items.some((w) => w.dir === "in" && w.frame.type === "unsubscribed" && w.frame.topic === "rt-gone"),
      "the unsubscribed reply",
    );
    await httpPublish(server, "rt-gone", '"after"');
    await httpPublish(server, "rt-kept", '"marker"');
    await kept.got.count(1, "the marker on the other topic");
    assert.equal(gone.got.items.length, 1, "no callback after unsubscribe");
    const pubsGone = wired.wire.items.filter((w) => w.dir === "in" && w.frame.type === "pub" && w.frame.topic === "rt-gone");
    assert.equal(pubsGone.length, 1, "the server sent nothing on rt-gone after unsubscribed");
    const unsub = wired.wire.items.find((w) => w.dir === "out" && w.frame.type === "unsubscribe");
    assert.equal(unsub.frame.topic, "rt-gone");
    // Unsubscribing twice is a no-op.
    gone.sub.unsubscribe();
    assert.equal(wired.wire.items.filter((w) => w.dir === "out" && w.frame.type === "unsubscribe").length, 1);
  });

  test("callbacks stop at once, even for publications already on their way", async () => {
    const a = client();
    const got = [];
    const sub = a.subscribe("rt-instant", (m) => {
      got.push(m.offset);
      sub.unsubscribe(); // inside the callback: nothing after this one
    });
    await within(sub.ready, "sub.ready");
    const marker = collect(a, "rt-instant-marker");
    await within(marker.sub.ready, "marker ready");
    // Both published before the client can act on the first.
    await Promise.all([httpPublish(server, "rt-instant", "1"), httpPublish(server, "rt-instant", "2")]);
    await httpPublish(server, "rt-instant-marker", "1");
    await marker.got.count(1, "the marker");
    assert.deepEqual(got, [1]);
  });

  test("two subscriptions of one topic share one server subscription", async () => {
    const wired = wiredWebSocket();
    const a = client({ WebSocket: wired.WebSocket });
    const first = collect(a, "rt-shared");
    const second = collect(a, "rt-shared");
    await within(Promise.all([first.sub.ready, second.sub.ready]), "both ready");
    await httpPublish(server, "rt-shared", '"x"');
    await first.got.count(1, "first");
    await second.got.count(1, "second");
    first.sub.unsubscribe();
    await httpPublish(server, "rt-shared", '"y"');
    await second.got.count(2, "second still subscribed");
    assert.equal(first.got.items.length, 1);
    const out = wired.wire.items.filter((w) => w.dir === "out").map((w) => w.frame.type);
    assert.deepEqual(out, ["subscribe"], "one subscribe, and no unsubscribe while one subscription is left");
    second.sub.unsubscribe();
    await wired.wire.wait((items) => items.some((w) => w.dir === "in" && w.frame.type === "unsubscribed"), "unsubscribed");
  });

  test("subscribe with since resumes from a position the application kept", async () => {
    const a = client();
    const first = collect(a, "rt-since");
    const { epoch } = await within(first.sub.ready, "first ready");
    for (const n of [1, 2, 3, 4]) await httpPublish(server, "rt-since", String(n));
    await first.got.count(4, "four publications");
    a.close();

    const b = client();
    const events = recordEvents(b, ["subscribed"]);
    const got = new Recorder();
    const sub = b.subscribe("rt-since", (m) => got.push(m), { since: { offset: 2, epoch } });
    const ready = await within(sub.ready, "ready with since");
    assert.equal(ready.recovered, true);
    assert.equal(ready.missed, 2);
    assert.equal(ready.offset, 4);
    await got.count(2, "the two after offset 2");
    assert.deepEqual(got.items.map((m) => [m.offset, m.data]), [[3, 3], [4, 4]]);
    assert.equal(events.of("subscribed")[0].resubscribed, false);
  });

  test("ping: an application-level round trip", async () => {
    const a = client();
    await within(new Promise((resolve) => a.on("state", (s) => s === "open" && resolve())), "open");
    const rtt = await within(a.ping(), "pong");
    assert.equal(typeof rtt, "number");
    assert.ok(rtt >= 0);
  });

  test("the server serves this very file at /ringsocket.js", async () => {
    const res = await fetch(`${server.httpUrl}/ringsocket.js`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /javascript/);
    const mine = await readFile(path.join(CLIENT_DIR, "ringsocket.js"), "utf8");
    assert.equal(await res.text(), mine);
  });
});
