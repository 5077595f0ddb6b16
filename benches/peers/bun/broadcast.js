// `bun broadcast.js PORT`: Bun's pub/sub room server (uWebSockets' TopicTree
// underneath), written the way Bun's docs show it: every connection subscribes to the
// topic named by its URL's path, and `ws.publish(topic, message)` sends each message to
// every other subscriber (publish excludes the sender). One JavaScript thread, so it
// compares with `ringsocket serve --workers 1` on one pinned core.
const port = Number(process.argv[2] ?? 9006);

const compress = process.env.DEFLATE === "1";

const server = Bun.serve({
  hostname: "127.0.0.1",
  port,
  fetch(req, server) {
    const room = new URL(req.url).pathname;
    if (server.upgrade(req, { data: { room } })) {
      return; // Bun answered the handshake with 101.
    }
    return new Response("WebSocket only\n", { status: 426 });
  },
  websocket: {
    // DEFLATE=1: permessage-deflate as Bun documents it (`perMessageDeflate: true`, its
    // shared compressor), for the compression table of benches/README.md.
    perMessageDeflate: compress,
    // Bun's defaults are kept: 16 MiB payload limit, 120 s idle timeout, 16 MiB
    // backpressure limit per connection.
    open(ws) {
      ws.subscribe(ws.data.room);
    },
    message(ws, message) {
      // Bun compresses a message only when asked to (its third argument).
      ws.publish(ws.data.room, message, compress);
    },
  },
});

console.log(`bun-broadcast listening on ws://${server.hostname}:${server.port}/ROOM`);
