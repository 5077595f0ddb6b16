// Error replies, refusals by token, user callbacks that throw, and closing.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { RingSocket, RingSocketError } from "../ringsocket.js";
import {
  Recorder,
  WebSocket,
  freePort,
  httpPublish,
  jwt,
  recordEvents,
  rejection,
  startProxy,
  startServer,
  wiredWebSocket,
  within,
} from "../harness.mjs";

const SECRET = "a-test-secret-of-at-least-32-characters";
let server; // no auth
let authed; // jwt_secret
const clients = [];
const cleanups = [];

function client(url, options = {}) {
  const rs = new RingSocket(url, { WebSocket, minReconnectDelay: 20, maxReconnectDelay: 200, ...options });
  clients.push(rs);
  return rs;
}

function token(claims = {}) {
  return jwt({ sub: "tester", exp: Math.floor(Date.now() / 1000) + 3600, topics: ["lobby", "room:*"], publish: ["lobby"], ...claims }, SECRET);
}

function opened(rs) {
  if (rs.state === "open") return Promise.resolve();
  return within(new Promise((resolve) => rs.on("state", (s) => s === "open" && resolve())), "state open");
}

before(async () => {
  [server, authed] = await Promise.all([startServer(), startServer({ settings: { jwt_secret: SECRET } })]);
});

after(async () => {
  for (const rs of clients) rs.close();
  for (const fn of cleanups) await fn();
  await Promise.all([server?.stop(), authed?.stop()]);
});

describe("errors", { timeout: 60_000 }, () => {
  test("a bad topic name: bad_topic for subscribe and publish; the connection stays", async () => {
    const rs = client(server.wsUrl);
    const bad = rs.subscribe("bad topic!", () => assert.fail("no publication on a refused topic"));
    const err = await within(rejection(bad.ready, "ready of a bad topic"), "the refusal");
    assert.ok(err instanceof RingSocketError);
    assert.equal(err.code, "bad_topic");
    assert.equal(err.topic, "bad topic!");
    assert.equal(bad.active, false);

    const perr = await within(rejection(rs.publish("bad topic!", 1), "publish to a bad topic"), "the refusal");
    assert.equal(perr.code, "bad_topic");

    const got = new Recorder();
    const good = rs.subscribe("err-good", (m) => got.push(m));
    await within(good.ready, "a good topic after");
    await within(rs.publish("err-good", "still fine"), "a publish after");
    await got.count(1, "the publication");
    assert.equal(rs.state, "open");
  });

  test("a frame the server cannot read: an error frame without id reaches the error event", async () => {
    const wired = wiredWebSocket();
    const rs = client(server.wsUrl, { WebSocket: wired.WebSocket });
    const events = recordEvents(rs, ["error"]);
    await opened(rs);
    wired.sockets[0].send("this is not JSON");
    const err = await events.waitFor("error", (e) => e.code === "bad_request", "a bad_request error");
    assert.ok(err instanceof RingSocketError);
    assert.equal(err.id, undefined);
    assert.equal(rs.state, "open");
    await within(rs.ping(), "a round trip after");
  });

  test("the server's errors that answer no pending request go to the error event", async () => {
    const wired = wiredWebSocket();
    const rs = client(server.wsUrl, { WebSocket: wired.WebSocket });
    const events = recordEvents(rs, ["error"]);
    await opened(rs);
    // An id this client never used: not_subscribed, but no request of the client waits.
    wired.sockets[0].send(JSON.stringify({ id: 9999, type: "unsubscribe", topic: "err-never" }));
    const err = await events.waitFor("error", (e) => e.code === "not_subscribed", "not_subscribed");
    assert.equal(err.id, 9999);
    // A binary frame: bad_request without id.
    wired.sockets[0].send(Buffer.from([1, 2, 3]));
    await events.waitFor("error", (e) => e.code === "bad_request", "bad_request for a binary frame");
    assert.equal(rs.state, "open");
  });

  test("too_many_topics past max_topics_per_connection", async () => {
    const limited = await startServer({ settings: { max_topics_per_connection: 2 } });
    cleanups.push(() => limited.stop());
    const rs = client(limited.wsUrl);
    await within(Promise.all([rs.subscribe("tm-1", () => {}).ready, rs.subscribe("tm-2", () => {}).ready]), "two topics");
    const third = rs.subscribe("tm-3", () => {});
    const err = await within(rejection(third.ready, "ready of a third topic"), "the refusal");
    assert.equal(err.code, "too_many_topics");
    assert.equal(third.active, false);
  });

  test("not_allowed by the token's topics and publish claims", async () => {
    const rs = client(authed.wsUrl, { token: token() });
    const denied = rs.subscribe("secret", () => {});
    const err = await within(rejection(denied.ready, "ready of a topic not in the token"), "the refusal");
    assert.equal(err.code, "not_allowed");
    assert.equal(err.topic, "secret");

    const got = new Recorder();
    const room = rs.subscribe("room:7", (m) => got.push(m));
    await within(room.ready, "a topic the token allows by prefix");
    const perr = await within(rejection(rs.publish("room:7", "x"), "publish outside the publish claim"), "the refusal");
    assert.equal(perr.code, "not_allowed");
    await httpPublish(authed, "room:7", '"from the backend"');
    await got.count(1, "the backend's publication");

    const lobby = new Recorder();
    await within(rs.subscribe("lobby", (m) => lobby.push(m)).ready, "lobby");
    const ack = await within(rs.publish("lobby", { ok: true }), "publish inside the claim");
    assert.equal(ack.offset, 1);
    await lobby.count(1, "the own publication");
  });

  test("the token function is called at every (re)connect, its token sent as ?token=", async () => {
    const proxy = await startProxy(authed.port);
    cleanups.push(() => proxy.close());
    const wired = wiredWebSocket();
    const issued = [];
    const rs = client(proxy.wsUrl, {
      WebSocket: wired.WebSocket,
      token: async () => {
        const t = token({ sub: `call-${issued.length + 1}` });
        issued.push(t);
        return t;
      },
    });
    const events = recordEvents(rs, ["state"]);
    const got = new Recorder();
    await within(rs.subscribe("lobby", (m) => got.push(m)).ready, "ready");
    proxy.cut();
    await events.waitFor("state", (s) => s === "connecting" && rs.state === "connecting", "connecting after the cut");
    proxy.restore();
    await events.wait((items) => items.filter((e) => e.value === "open").length === 2, "open again");
    assert.ok(issued.length >= 2, `called at least twice, was ${issued.length}`);
    assert.equal(wired.urls.length, issued.length, "one call per connection attempt");
    wired.urls.forEach(({ url }, i) => {
      const u = new URL(url);
      assert.equal(u.pathname, "/v1");
      assert.equal(u.searchParams.get("token"), issued[i]);
    });
  });

  test("without a token the server refuses the handshake: errors, then closed without reconnect", async () => {
    const rs = client(authed.wsUrl, { reconnect: false });
    const events = recordEvents(rs);
    const sub = rs.subscribe("lobby", () => {});
    const err = await within(rejection(sub.ready, "ready without a token"), "the rejection");
    assert.equal(err.code, "closed");
    assert.equal(rs.state, "closed");
    assert.ok(events.of("error").some((e) => e.code === "socket"), "the socket error was reported");
    assert.deepEqual(events.of("state"), ["connecting", "closed"]);
    assert.equal(events.of("reconnecting").length, 0);
  });

  test("a throwing callback or listener does not break the client", async () => {
    const rs = client(server.wsUrl);
    const errors = recordEvents(rs, ["error"]);
    rs.on("state", () => {
      throw new Error("listener boom");
    });
    const got = new Recorder();
    const sub = rs.subscribe("err-throw", (m) => {
      got.push(m);
      if (m.data === 1) throw new Error("callback boom");
    });
    const other = new Recorder();
    rs.subscribe("err-throw", (m) => other.push(m)); // a second callback of the same topic
    await within(sub.ready, "ready");
    await httpPublish(server, "err-throw", "1");
    await httpPublish(server, "err-throw", "2");
    await got.count(2, "both, after the first threw");
    await other.count(2, "the other callback got both too");
    const codes = errors.of("error").map((e) => [e.code, e.cause?.message]);
    assert.deepEqual(
      codes.filter(([, m]) => m === "callback boom"),
      [["callback", "callback boom"]],
    );
    assert.ok(codes.some(([c, m]) => c === "callback" && m === "listener boom"));
    assert.equal(rs.state, "open");
  });

  test("publish before the connection is open waits for it", async () => {
    const rs = client(server.wsUrl);
    assert.equal(rs.state, "connecting");
    const ack = await within(rs.publish("err-early", { early: true }), "the ack");
    assert.equal(ack.offset, 1);
  });

  test("the publish queue is bounded; close rejects what waits", async () => {
    const port = await freePort(); // nobody listens: never opens
    const rs = client(`ws://127.0.0.1:${port}/v1`, { maxQueuedPublishes: 2 });
    const p1 = rs.publish("q", 1);
    const p2 = rs.publish("q", 2);
    const full = await rejection(rs.publish("q", 3), "the third publish");
    assert.equal(full.code, "queue_full");
    const sub = rs.subscribe("q", () => {});
    rs.close();
    for (const p of [p1, p2, sub.ready]) {
      const err = await within(rejection(p, "a waiting request"), "its rejection");
      assert.equal(err.code, "closed");
    }
    assert.equal((await rejection(rs.publish("q", 4))).code, "closed");
    assert.throws(() => rs.subscribe("q", () => {}), { code: "closed" });
    assert.equal(rs.state, "closed");
  });

  test("close rejects a publish in flight", async () => {
    const rs = client(server.wsUrl);
    await opened(rs);
    const p = rs.publish("err-inflight", "x");
    rs.close();
    assert.equal((await within(rejection(p), "the rejection")).code, "closed");
  });

  test("unsubscribe before the reply rejects ready with unsubscribed", async () => {
    const rs = client(server.wsUrl);
    const sub = rs.subscribe("err-early-unsub", () => {});
    sub.unsubscribe();
    const err = await within(rejection(sub.ready), "the rejection");
    assert.equal(err.code, "unsubscribed");
  });

  test("arguments are checked", async () => {
    const rs = client(server.wsUrl);
    assert.throws(() => rs.subscribe(42, () => {}), TypeError);
    assert.throws(() => rs.subscribe("t", "not a function"), TypeError);
    assert.throws(() => rs.subscribe("t", () => {}, { since: { offset: -1, epoch: "e" } }), TypeError);
    assert.throws(() => rs.on("nope", () => {}), TypeError);
    await assert.rejects(rs.publish("t", undefined), TypeError);
    await assert.rejects(rs.publish("t", 10n), TypeError);
    assert.throws(() => new RingSocket("ftp://x/v1", { WebSocket }), SyntaxError);
    if (globalThis.WebSocket === undefined) {
      assert.throws(() => new RingSocket("ws://x/v1"), TypeError, "no WebSocket given and none global (node 20)");
    }
  });
});
