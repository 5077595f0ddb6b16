// The demo page (clients/demo/index.html, served at /) in headless Chromium against a real
// `ringsocket serve`: two pages reach "open", chat both ways, see each other's cursors, and
// page B recovers the messages it missed while its connection was cut.
//
// Two scenarios, each a sequence of steps:
// - In memory (steps 01-08): page A talks to the server directly, page B through a TCP
//   proxy (`TcpProxy`) that the test closes and reopens on the same port: the server keeps
//   running, so its in-memory history is still there when B resubscribes.
// - Redis (steps 09-12): a throwaway `redis-server` (started by the test on a free port,
//   nothing saved) and two servers behind it, node 1 (page B) and node 2 (page A). Node 1
//   is stopped (SIGTERM, until it exits) and started again on the same port: its history
//   is at Redis, so B, reconnecting by itself, recovers what A and POST /publish sent to
//   node 2 meanwhile.
// `checkRecovery` takes the outage as an argument: `proxyOutage` or `restartOutage`.
//
// Run it with tests/browser/run.sh, which installs chromium, redis-server and
// playwright-core. Env:
//   RINGSOCKET_BIN  the server binary (default: target/release/ringsocket at the repo root)
//   SHOTS_DIR       where screenshots and logs go (default: target/browser): server.log,
//                   and for the Redis scenario redis-server.log, redis-node{1,2}.log and
//                   redis-frames.log (every WebSocket frame of pages A and B)
//   CHROMIUM        the browser (default: /usr/bin/chromium)

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { createWriteStream, existsSync, mkdirSync, rmSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.RINGSOCKET_BIN || path.join(ROOT, "target/release/ringsocket");
const SHOTS = process.env.SHOTS_DIR || path.join(ROOT, "target/browser");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Every wait is for a condition (the DOM, an HTTP answer), with this generous bound.
const WAIT = 20_000;
// A reconnect waits for the client's backoff first.
const RECONNECT_WAIT = 45_000;

// ---- the server ------------------------------------------------------------------------

async function freePort() {
  const srv = net.createServer();
  await new Promise((ok, fail) => srv.once("error", fail).listen(0, "127.0.0.1", ok));
  const { port } = srv.address();
  await new Promise((ok) => srv.close(ok));
  return port;
}

/** Runs `cmd args`, its output appended to SHOTS/<logName>, until ready() says yes (polled
 *  every 100 ms, for at most WAIT). stop(): SIGTERM, and SIGKILL after 10 s, until it exits. */
async function startProcess(what, cmd, args, { env = process.env, logName, ready }) {
  const log = createWriteStream(path.join(SHOTS, logName), { flags: "a" });
  log.write(`\n$ ${cmd} ${args.map((arg) => (arg === "" ? "''" : arg)).join(" ")}\n`);
  const proc = spawn(cmd, args, { env, stdio: ["ignore", "pipe", "pipe"] });
  proc.stdout.pipe(log, { end: false });
  proc.stderr.pipe(log, { end: false });
  let exited = null;
  const exit = new Promise((ok) => {
    proc.once("error", (error) => ok((exited = `could not start: ${error.message}`)));
    proc.once("exit", (code, signal) => ok((exited = `exited with ${signal ?? code}`)));
  });
  const stop = async () => {
    if (!exited) {
      proc.kill("SIGTERM");
      const kill = setTimeout(() => proc.kill("SIGKILL"), 10_000);
      await exit;
      clearTimeout(kill);
    }
    log.end();
    return exited;
  };
  const deadline = Date.now() + WAIT;
  for (;;) {
    if (exited) throw new Error(`${what} ${exited}; see ${SHOTS}/${logName}`);
    if (await ready()) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`${what}: not ready within ${WAIT} ms; see ${SHOTS}/${logName}`);
    }
    await new Promise((ok) => setTimeout(ok, 100)); // the poll's interval
  }
  return { stop };
}

/** `ringsocket serve --bind 127.0.0.1:PORT --set k=v ...`, ready once /healthz answers.
 *  Its output goes to SHOTS/server.log, or to `logName`. */
async function startServer(port, settings, { logName = "server.log" } = {}) {
  assert.ok(existsSync(BIN), `no server binary at ${BIN} (set RINGSOCKET_BIN)`);
  const args = ["serve", "--bind", `127.0.0.1:${port}`];
  for (const [key, value] of Object.entries(settings)) args.push("--set", `${key}=${value}`);
  // The server reads every RINGSOCKET_<SETTING> variable and refuses unknown ones: ours
  // (RINGSOCKET_BIN) stays here; others (RINGSOCKET_IO_BACKEND, ...) go through.
  const { RINGSOCKET_BIN, ...env } = process.env;
  const url = `http://127.0.0.1:${port}`;
  const { stop } = await startProcess("ringsocket serve", BIN, args, {
    env,
    logName,
    ready: () => fetch(`${url}/healthz`).then((r) => r.ok, () => false),
  });
  return { port, url, settings, logName, stop };
}

/** A throwaway `redis-server` on a free port of 127.0.0.1, nothing saved to disk; ready
 *  once it answers PING with PONG. */
async function startRedis() {
  const port = await freePort();
  const args = ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
  const { stop } = await startProcess("redis-server", "redis-server", args, {
    logName: "redis-server.log",
    ready: () => redisPing(port),
  });
  return { port, url: `redis://127.0.0.1:${port}`, stop };
}

function redisPing(port) {
  return new Promise((ok) => {
    let reply = "";
    const socket = net.connect(port, "127.0.0.1", () => socket.write("PING\r\n"));
    const done = (answer) => {
      socket.destroy();
      ok(answer);
    };
    socket.setTimeout(1_000, () => done(false));
    socket.on("error", () => done(false));
    socket.on("data", (chunk) => {
      reply += chunk;
      if (reply.includes("\r\n")) done(reply.startsWith("+PONG")); // -LOADING: not yet
    });
  });
}

async function publishOverHttp(server, topic, data) {
  const r = await fetch(`${server.url}/publish/${topic}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(data),
  });
  assert.ok(r.ok, `POST /publish/${topic}: ${r.status} ${await r.text()}`);
}

// ---- the cut: a TCP proxy in front of the server -----------------------------------------

/** 127.0.0.1:port -> 127.0.0.1:target. cut() stops listening and drops every connection
 *  through it; restore() listens again on the same port. */
class TcpProxy {
  constructor(target) {
    this.target = target;
    this.port = 0;
    this.server = null;
    this.sockets = new Set();
  }

  async listen() {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.target, "127.0.0.1");
      const drop = () => {
        client.destroy();
        upstream.destroy();
      };
      for (const socket of [client, upstream]) {
        this.sockets.add(socket);
        socket.once("close", () => this.sockets.delete(socket));
        socket.on("error", drop);
      }
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise((ok, fail) =>
      this.server.once("error", fail).listen(this.port, "127.0.0.1", ok),
    );
    this.port = this.server.address().port;
  }

  async cut() {
    if (!this.server) return;
    const closed = new Promise((ok) => this.server.close(ok));
    for (const socket of this.sockets) socket.destroy();
    await closed;
    this.server = null;
  }

  restore() {
    return this.listen();
  }
}

/** The outage of the in-memory scenario: page B's connection is cut at the proxy (new
 *  connections refused) while the server, and so its history, stays up. */
function proxyOutage(proxy) {
  return { cut: () => proxy.cut(), restore: () => proxy.restore() };
}

/** The outage of the Redis scenario: the server `cluster[name]` stops (SIGTERM, until it
 *  has exited: new connections refused) and starts again on the same port with the same
 *  settings; `cluster[name]` is then the new process. */
function restartOutage(cluster, name) {
  return {
    async cut() {
      const exited = await cluster[name].stop();
      assert.equal(exited, "exited with 0", `${name} on SIGTERM`);
    },
    async restore() {
      const { port, settings, logName } = cluster[name];
      cluster[name] = await startServer(port, settings, { logName });
    },
  };
}

// ---- the pages -------------------------------------------------------------------------

// A and B are the two pages of the scenario that runs (the Redis one opens its own).
let server, proxy, browser, a, b;
const pageErrors = [];
// The Redis scenario: redis-server, node1 (page B) and node2 (page A).
const cluster = {};

/** A page in a context of its own; `watch(page)` runs before it loads. */
async function openPage(label, url, viewport, watch = () => {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  watch(page);
  page.setDefaultTimeout(WAIT);
  page.on("pageerror", (error) => pageErrors.push(`page ${label}: ${error.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") console.log(`# page ${label} console: ${msg.text()}`);
  });
  await page.goto(url);
  return page;
}

async function screenshots(step) {
  for (const [label, page] of [["a", a], ["b", b]]) {
    if (page) await page.screenshot({ path: path.join(SHOTS, `${step}-${label}.png`), fullPage: true });
  }
}

const stateOf = (page) => page.locator("#state").getAttribute("data-state");

async function waitForState(page, wanted, timeout = WAIT) {
  await page.waitForFunction(
    (s) => document.getElementById("state").dataset.state === s,
    wanted,
    { timeout },
  );
  assert.equal(await page.locator("#state").textContent(), wanted);
}

async function setName(page, name) {
  await page.fill("#name", name);
  await page.locator("#name").dispatchEvent("change");
}

/** Types a message and sends it with Enter; the page empties the field on the server's ack. */
async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
  await page.waitForFunction(() => document.getElementById("text").value === "");
}

const messageTexts = (page) =>
  page.locator("#messages li").evaluateAll((lis) => lis.map((li) => li.textContent));

async function waitForMessage(page, name, text, timeout = WAIT) {
  const li = page.locator("#messages li").filter({ hasText: text });
  await li.first().waitFor({ timeout });
  assert.equal(await li.count(), 1, `"${text}" shown once`);
  assert.equal(await li.locator(".name").textContent(), name);
}

/** The cursor of `name` on `page`, once its position is within 0.01 of (x, y). */
async function waitForCursorAt(page, name, x, y) {
  await page.waitForFunction(
    ([name, x, y]) => {
      const el = [...document.querySelectorAll("#cursors .cursor")].find(
        (c) => c.dataset.name === name,
      );
      return el && Math.abs(el.dataset.x - x) < 0.01 && Math.abs(el.dataset.y - y) < 0.01;
    },
    [name, x, y],
  );
  return page.locator(`#cursors .cursor[data-name="${name}"]`);
}

/** Moves the mouse to the fractions (x, y) of the page's cursor area. */
async function pointAt(page, x, y) {
  const box = await page.locator("#cursors").boundingBox();
  await page.mouse.move(box.x + x * box.width, box.y + y * box.height, { steps: 4 });
}

// ---- the steps -------------------------------------------------------------------------

// The steps of a scenario build on each other: after a failure the rest of that scenario
// is skipped, with screenshots of the failing step.
function scenario() {
  let failed = false;
  return (name, shot, fn) => test(name, async (t) => {
    if (failed) return t.skip("an earlier step of this scenario failed");
    try {
      await fn(t);
    } catch (error) {
      failed = true;
      await screenshots(`${shot}-FAILED`).catch(() => {});
      throw error;
    } finally {
      if (!failed) await screenshots(shot);
    }
  });
}
const step = scenario();

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  server = await startServer(await freePort(), { conflate_topics: "cursors:*" });
  proxy = new TcpProxy(server.port);
  await proxy.listen();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
});

after(async () => {
  await browser?.close();
  await proxy?.cut();
  await server?.stop();
  await cluster.node1?.stop();
  await cluster.node2?.stop();
  await cluster.redis?.stop();
  cluster.frames?.end();
});

step("both pages load the demo and reach open", "01-open", async () => {
  a = await openPage("a", `${server.url}/`, { width: 1100, height: 760 });
  // B is narrow (a phone): the layout becomes one column.
  b = await openPage("b", `http://127.0.0.1:${proxy.port}/`, { width: 400, height: 900 });
  for (const page of [a, b]) {
    await waitForState(page, "open");
    assert.equal(await page.title(), "ringsocket demo");
    assert.equal(await page.locator("#recovered").textContent(), "", "no reconnect yet");
  }
  const [chat, cursors] = await Promise.all(
    ["#messages", "#cursors"].map((sel) => b.locator(sel).boundingBox()),
  );
  assert.ok(cursors.y >= chat.y + chat.height, "narrow window: the cursor area under the chat");
  await setName(a, "alice");
  await setName(b, "bob");
});

step("chat: A's message shows on B, and B's on A", "02-chat", async () => {
  await say(a, "hello from alice");
  await waitForMessage(b, "alice", "hello from alice");
  await waitForMessage(a, "alice", "hello from alice");
  await say(b, "hi alice, bob here");
  await waitForMessage(a, "bob", "hi alice, bob here");
  await waitForMessage(b, "bob", "hi alice, bob here");
});

step("cursors: A's pointer shows on B, with A's name, where it is", "03-cursor", async () => {
  await pointAt(a, 0.3, 0.5);
  await waitForCursorAt(b, "alice", 0.3, 0.5);
  await pointAt(a, 0.25, 0.6);
  const cursor = await waitForCursorAt(b, "alice", 0.25, 0.6);
  assert.equal(await cursor.textContent(), "alice");
  // Drawn where it is: the cursor's anchor at (0.25, 0.6) of B's area, give or take 2 %.
  const area = await b.locator("#cursors").boundingBox();
  const at = await cursor.boundingBox();
  assert.ok(Math.abs((at.x - area.x) / area.width - 0.25) < 0.02, `x: ${JSON.stringify({ at, area })}`);
  assert.ok(Math.abs((at.y - area.y) / area.height - 0.6) < 0.02, `y: ${JSON.stringify({ at, area })}`);
  // Nobody draws their own cursor; B's pointer shows on A.
  assert.equal(await a.locator('#cursors .cursor[data-name="alice"]').count(), 0);
  await pointAt(b, 0.8, 0.2);
  await waitForCursorAt(a, "bob", 0.8, 0.2);
});

step("cursors: B drops A's cursor after about 10 s without news", "04-cursor-gone", async () => {
  // Out of the area (one move event, outside it), so A publishes no more.
  await a.mouse.move(1, 1);
  const since = Date.now();
  await b.locator('#cursors .cursor[data-name="alice"]').waitFor({ state: "detached", timeout: 30_000 });
  assert.ok(Date.now() - since > 9_000, `dropped after ${Date.now() - since} ms, not ~10 s`);
});

/** B's connection goes away (`outage.cut()`), `sendWhileCut()` publishes messages that B
 *  cannot see and returns their texts, the connection comes back (`outage.restore()`), and
 *  B shows exactly those messages, in order, and says how many it recovered. */
async function checkRecovery({ outage, sendWhileCut, cutShot = "05-cut" }) {
  const before = await messageTexts(b);
  await outage.cut();
  await b.waitForFunction(() => document.getElementById("state").dataset.state !== "open");
  await screenshots(cutShot);
  const texts = await sendWhileCut();
  assert.deepEqual(await messageTexts(b), before, "B, cut off, shows nothing new");
  await outage.restore();
  await waitForState(b, "open", RECONNECT_WAIT);
  await b.waitForFunction(() => document.getElementById("recovered").textContent !== "");
  const recovered = b.locator("#recovered");
  assert.equal(
    await recovered.textContent(),
    `${texts.length} messages recovered after the last reconnect`,
  );
  assert.equal(await recovered.getAttribute("data-recovered"), "true");
  assert.equal(await recovered.getAttribute("data-missed"), String(texts.length));
  await b.waitForFunction((n) => document.querySelectorAll("#messages li").length >= n, before.length + texts.length);
  const after = await messageTexts(b);
  assert.deepEqual(after.slice(0, before.length), before, "what B had is still there");
  const missed = after.slice(before.length);
  assert.equal(missed.length, texts.length, `no duplicates: ${JSON.stringify(missed)}`);
  texts.forEach((text, i) => assert.ok(missed[i].includes(text), `#${i}: ${missed[i]} / ${text}`));
}

step("recovery: B, cut at the proxy, shows what A and POST /publish sent", "06-recovered", async () => {
  await checkRecovery({
    outage: proxyOutage(proxy),
    async sendWhileCut() {
      await say(a, "sent while bob was away (1)");
      await publishOverHttp(server, "lobby", { name: "bot", text: "a backend publish" });
      await waitForMessage(a, "bot", "a backend publish");
      await say(a, "sent while bob was away (2)");
      return ["sent while bob was away (1)", "a backend publish", "sent while bob was away (2)"];
    },
  });
  await waitForMessage(b, "bot", "a backend publish");
  // Live again: a new message from A arrives as usual.
  await say(a, "welcome back, bob");
  await waitForMessage(b, "alice", "welcome back, bob");
  assert.equal(await stateOf(a), "open", "A was never cut");
});

/** An HS256 JWT, as `jwt_secret` verifies it. */
function jwt(secret, claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

step("token: ?token= on the page URL reaches the server; a refusal is shown", "07-token", async () => {
  const secret = "browser-test-secret-of-at-least-32-characters";
  const guarded = await startServer(await freePort(), { jwt_secret: secret });
  try {
    // The server refuses a /v1 upgrade without a token (401): "open" means the page's
    // token got there. It allows lobby but not cursors:lobby.
    const token = jwt(secret, {
      sub: "carol",
      topics: ["lobby"],
      publish: ["lobby"],
      exp: Math.floor(Date.now() / 1000) + 600,
    });
    const c = await openPage("c", `${guarded.url}/?token=${token}`, { width: 800, height: 700 });
    try {
      await waitForState(c, "open");
      await c.locator("#error").waitFor({ state: "visible" });
      assert.match(await c.locator("#error").textContent(), /^not_allowed: .*cursors:lobby/);
      await setName(c, "carol");
      await say(c, "carol has a token");
      await waitForMessage(c, "carol", "carol has a token");
      await c.screenshot({ path: path.join(SHOTS, "07-token-c.png"), fullPage: true });
    } finally {
      await c.context().close();
    }
  } finally {
    await guarded.stop();
  }
});

step("no uncaught errors, and no refusal shown, on A and B", "08-end", async () => {
  assert.deepEqual(pageErrors, []);
  for (const page of [a, b]) assert.ok(await page.locator("#error").isHidden());
});

// ---- the Redis scenario: node 1 restarts, B recovers from Redis ---------------------------

const redisStep = scenario();

/** Every WebSocket frame of `page`, to SHOTS/redis-frames.log: what the server said, if a
 *  recovery goes wrong. */
function logFrames(page, label, log) {
  page.on("websocket", (ws) => {
    const t0 = Date.now();
    const line = (what) => log.write(`${new Date().toISOString()} ${label} ${what}\n`);
    line(`open ${ws.url()}`);
    ws.on("framesent", ({ payload }) => line(`> ${payload}`));
    ws.on("framereceived", ({ payload }) => line(`< ${payload}`));
    ws.on("socketerror", (error) => line(`error ${error}`));
    ws.on("close", () => line(`close after ${Date.now() - t0} ms`));
  });
}

/** The error of `page`'s next WebSocket that fails (a connection refused, say), within
 *  `timeout`. */
function nextSocketError(page, timeout) {
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => {
      page.off("websocket", onSocket);
      fail(new Error(`no failed WebSocket attempt within ${timeout} ms`));
    }, timeout);
    const onSocket = (ws) =>
      ws.once("socketerror", (error) => {
        clearTimeout(timer);
        page.off("websocket", onSocket);
        ok(String(error));
      });
    page.on("websocket", onSocket);
  });
}

/** The offsets and texts of the chat on `page`, as shown. */
const messageRows = (page) =>
  page
    .locator("#messages li")
    .evaluateAll((lis) => lis.map((li) => `${li.dataset.offset} ${li.textContent}`));

redisStep("redis: B on node 1 and A on node 2, one redis-server, both reach open", "09-redis-open", async () => {
  for (const page of [a, b]) await page?.context().close();
  a = b = null;
  pageErrors.length = 0; // step 08 looked at those of the pages just closed
  for (const log of ["redis-server.log", "redis-node1.log", "redis-node2.log", "redis-frames.log"]) {
    rmSync(path.join(SHOTS, log), { force: true });
  }
  cluster.redis = await startRedis();
  const settings = { redis_url: cluster.redis.url, conflate_topics: "cursors:*" };
  cluster.node1 = await startServer(await freePort(), settings, { logName: "redis-node1.log" });
  cluster.node2 = await startServer(await freePort(), settings, { logName: "redis-node2.log" });
  cluster.frames = createWriteStream(path.join(SHOTS, "redis-frames.log"));
  const watch = (label) => (page) => logFrames(page, label, cluster.frames);
  b = await openPage("b@node1", `${cluster.node1.url}/`, { width: 400, height: 900 }, watch("b@node1"));
  a = await openPage("a@node2", `${cluster.node2.url}/`, { width: 1100, height: 760 }, watch("a@node2"));
  for (const page of [a, b]) {
    await waitForState(page, "open");
    assert.equal(await page.locator("#recovered").textContent(), "", "no reconnect yet");
  }
  await setName(a, "alice");
  await setName(b, "bob");
});

redisStep("redis: chat flows between the nodes, one offset per message on both", "10-redis-chat", async () => {
  await say(a, "hello from alice on node 2");
  await waitForMessage(b, "alice", "hello from alice on node 2");
  await waitForMessage(a, "alice", "hello from alice on node 2");
  await say(b, "hi alice, bob on node 1");
  await waitForMessage(a, "bob", "hi alice, bob on node 1");
  await waitForMessage(b, "bob", "hi alice, bob on node 1");
  await publishOverHttp(cluster.node1, "lobby", { name: "bot", text: "a backend publish to node 1" });
  await waitForMessage(a, "bot", "a backend publish to node 1");
  await waitForMessage(b, "bot", "a backend publish to node 1");
  // Numbered at Redis: the same offsets, in the same order, on both nodes.
  assert.deepEqual(await messageRows(b), await messageRows(a));
});

redisStep("redis: node 1 restarts; B reconnects and recovers what node 2 got", "11-redis-restart", async () => {
  await checkRecovery({
    outage: restartOutage(cluster, "node1"),
    cutShot: "11-redis-restart-cut",
    async sendWhileCut() {
      const refused = nextSocketError(b, RECONNECT_WAIT);
      await say(a, "sent while node 1 was down (1)");
      await publishOverHttp(cluster.node2, "lobby", { name: "bot", text: "a backend publish to node 2" });
      await waitForMessage(a, "bot", "a backend publish to node 2");
      await say(a, "sent while node 1 was down (2)");
      // B retries by itself while node 1 is down: one attempt refused before the restart.
      assert.match(await refused, /REFUSED/);
      return ["sent while node 1 was down (1)", "a backend publish to node 2", "sent while node 1 was down (2)"];
    },
  });
  await waitForMessage(b, "bot", "a backend publish to node 2");
  assert.equal(await stateOf(a), "open", "A, on node 2, was never cut");
  assert.equal(await a.locator("#recovered").textContent(), "", "A never reconnected");
  // Live again, both ways, across the nodes.
  await say(a, "welcome back, bob");
  await waitForMessage(b, "alice", "welcome back, bob");
  await waitForMessage(a, "alice", "welcome back, bob");
  await say(b, "thanks, node 1 is back");
  await waitForMessage(a, "bob", "thanks, node 1 is back");
  await waitForMessage(b, "bob", "thanks, node 1 is back");
  // B's whole chat, recovered part included, is A's: same messages, offsets and order.
  assert.deepEqual(await messageRows(b), await messageRows(a));
});

redisStep("redis: no uncaught errors, and no refusal shown, on A and B", "12-redis-end", async () => {
  assert.deepEqual(pageErrors, []);
  for (const page of [a, b]) assert.ok(await page.locator("#error").isHidden());
});
