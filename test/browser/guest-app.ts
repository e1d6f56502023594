/**
 * The guest program the gateway tests talk to (CommonJS source, run with
 * `node` inside the VM; it needs the `ws` package in /home/agentos/node_modules).
 *
 * Port `recorderPort` is a raw TCP relay that appends every byte the guest
 * receives to `/home/agentos/received.log` before handing it to the app on
 * `recorderPort + 1`, so a test can search everything that reached the guest.
 *
 * App routes:
 *   /echo…            any method: JSON { method, url, headers, rawHeaders, body }
 *   /upload           sha256 and size of the request body, read as a stream
 *   /download?bytes=N N bytes of `patternBytes`, written with backpressure
 *   /duplex           echoes the request body as it arrives
 *   /sse              an event now, the next one after /sse-release
 *   /cors             sets its own CORS and Referrer-Policy headers
 *   /redirect?to=URL  302 to URL
 *   /cookies          three Set-Cookie headers with paths and a domain
 *   /log              the "METHOD url" of every request the app has seen
 *   WebSocket (any path): first message is JSON { url, headers }, then echo
 */
export const RECEIVED_LOG = "/home/agentos/received.log";

export function guestApp(recorderPort: number): string {
  return `
const http = require("http");
const net = require("net");
const fs = require("fs");
const crypto = require("crypto");
const { WebSocketServer } = require("ws");
const APP_PORT = ${recorderPort + 1};

function patternBytes(offset, length) {
  const bytes = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) bytes[i] = ((offset + i) * 7) % 251;
  return bytes;
}
function json(res, value, status = 200) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(value));
}

const seen = [];
const waiting = [];
const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://guest");
  seen.push(req.method + " " + req.url);
  switch (url.pathname) {
    case "/log":
      return json(res, seen);
    case "/upload": {
      const hash = crypto.createHash("sha256");
      let bytes = 0;
      req.on("data", (chunk) => { hash.update(chunk); bytes += chunk.length; });
      req.on("end", () => json(res, { bytes, sha256: hash.digest("hex") }));
      return;
    }
    case "/download": {
      const total = Number(url.searchParams.get("bytes"));
      res.writeHead(200, { "content-type": "application/octet-stream", "content-length": total });
      let sent = 0;
      const pump = () => {
        while (sent < total) {
          const n = Math.min(65536, total - sent);
          const chunk = patternBytes(sent, n);
          sent += n;
          if (!res.write(chunk)) return void res.once("drain", pump);
        }
        res.end();
      };
      return pump();
    }
    case "/duplex":
      res.writeHead(200, { "content-type": "text/plain" });
      res.flushHeaders();
      req.pipe(res);
      return;
    case "/sse":
      res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
      res.write("data: first\\n\\n");
      waiting.push(res);
      return;
    case "/sse-release": {
      const count = waiting.length;
      for (const stream of waiting.splice(0)) stream.end("data: last\\n\\n");
      return json(res, { released: count });
    }
    case "/cors":
      res.setHeader("Access-Control-Allow-Origin", "http://evil.example");
      res.setHeader("Access-Control-Allow-Credentials", "true");
      res.setHeader("Access-Control-Allow-Methods", "GET");
      res.setHeader("Access-Control-Expose-Headers", "x-secret");
      res.setHeader("Referrer-Policy", "unsafe-url");
      return json(res, { cors: true });
    case "/redirect":
      res.writeHead(302, { location: url.searchParams.get("to") });
      return res.end();
    case "/cookies":
      res.setHeader("set-cookie", ["a=1; Path=/; HttpOnly", "b=2; Path=/app; Domain=localhost", "c=3"]);
      return res.end("cookies");
    default: {
      const chunks = [];
      req.on("data", (chunk) => chunks.push(chunk));
      req.on("end", () => json(res, { method: req.method, url: req.url, headers: req.headers, rawHeaders: req.rawHeaders, body: Buffer.concat(chunks).toString("utf8") }));
    }
  }
});
const wss = new WebSocketServer({ server });
wss.on("connection", (socket, req) => {
  socket.send(JSON.stringify({ url: req.url, headers: req.headers }));
  socket.on("message", (data, isBinary) => socket.send(data, { binary: isBinary }));
});

server.listen(APP_PORT, () => {
  net.createServer((client) => {
    const app = net.connect(APP_PORT, "127.0.0.1");
    client.on("data", (chunk) => fs.appendFileSync(${JSON.stringify(RECEIVED_LOG)}, chunk));
    client.pipe(app);
    app.pipe(client);
    const done = () => { client.destroy(); app.destroy(); };
    client.on("error", done);
    app.on("error", done);
    client.on("close", done);
    app.on("close", done);
  }).listen(${recorderPort}, () => console.log("guest app ready"));
});
`;
}

/** The bytes /download sends, for checking on the host. */
export function patternBytes(offset: number, length: number): Buffer {
  const bytes = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) bytes[i] = ((offset + i) * 7) % 251;
  return bytes;
}
