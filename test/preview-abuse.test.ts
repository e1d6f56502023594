/**
 * The preview gateway under bad input, against the real server: malformed
 * tokens and paths, over-long request lines and headers, bodies over
 * preview.maxBodyBytes, clients that go away mid-stream, a guest that never
 * answers — and the gateway still serving afterwards. Whether a dropped client
 * leaks is checked twice: by the guest (its open responses and sockets return
 * to zero through the real server) and by the VM's own socket table
 * (`networkStats().connections` returns to zero) with the same gateway in front
 * of an embedded VM.
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "node:net";
import { request, createServer, type Server } from "node:http";
import WebSocket from "ws";
import { createVm, type Vm } from "agentvm";
import { PreviewGateway } from "../src/net/gateway.ts";
import { parsePreviewConfig, PreviewTokens } from "../src/net/previews.ts";
import { PreviewStore } from "../src/store/preview-store.ts";
import { SqliteStore } from "../src/store/sqlite-store.ts";
import { FORBIDDEN_BODY, GuestOutput, installIntoVm, onCleanup, rawRequest, responseOf, startGuestServer, startPreviewServer, tempDir, waitFor } from "./browser/support.ts";

const PORT = 3000;
const MAX_BODY = 256 * 1024;
const TIMEOUT_MS = 1500;

/** A guest that counts what is open: streaming responses, uploads, hung requests, WebSockets. */
const GUEST = `
const http = require("http");
const { WebSocketServer } = require("ws");
const counts = { streams: 0, uploads: 0, hanging: 0 };
const seen = [];
const json = (res, value) => { res.writeHead(200, { "content-type": "application/json" }); res.end(JSON.stringify(value)); };
const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://guest");
  seen.push(req.method + " " + req.url.slice(0, 200));
  switch (url.pathname) {
    case "/stats":
      return json(res, { ...counts, sockets: wss.clients.size, seen });
    case "/stream": {
      counts.streams++;
      res.on("close", () => counts.streams--);
      res.writeHead(200, { "content-type": "application/octet-stream" });
      const chunk = Buffer.alloc(64 * 1024, 120);
      const pump = () => {
        while (!res.destroyed && res.write(chunk));
        if (!res.destroyed) res.once("drain", pump);
      };
      return pump();
    }
    case "/upload": {
      counts.uploads++;
      res.on("close", () => counts.uploads--);
      let bytes = 0;
      req.on("data", (chunk) => (bytes += chunk.length));
      req.on("end", () => json(res, { bytes }));
      return;
    }
    case "/hang":
      counts.hanging++;
      res.on("close", () => counts.hanging--);
      return;
    default:
      return json(res, { url: req.url, method: req.method });
  }
});
// Idle keep-alive connections end soon, so a connection count can settle at zero.
server.keepAliveTimeout = 200;
const wss = new WebSocketServer({ server });
wss.on("connection", (socket) => socket.on("message", (data, isBinary) => socket.send(data, { binary: isBinary })));
server.listen(${PORT});
`;

interface Stats {
  streams: number;
  uploads: number;
  hanging: number;
  sockets: number;
  seen: string[];
}

const server = await startPreviewServer({ preview: { responseTimeoutMs: TIMEOUT_MS, maxBodyBytes: MAX_BODY } });
const vm = server.vm("abuse");
let path = "";
let token = "";

async function stats(): Promise<Stats> {
  const response = await fetch(`${server.previewUrl}${path}stats`);
  assert.equal(response.status, 200);
  return (await response.json()) as Stats;
}

async function settled(key: keyof Omit<Stats, "seen">): Promise<void> {
  await waitFor(async () => (await stats())[key] === 0, `the guest's open ${key} to return to 0`, 10_000, 50);
}

/** Opens a streaming download through the gateway and resolves once bytes flow. */
async function startDownload(port: number, at: string): Promise<{ destroy(): void }> {
  const req = request({ host: "127.0.0.1", port, path: at, agent: false });
  req.end();
  const response = await responseOf(req);
  assert.equal(response.statusCode, 200);
  let received = 0;
  response.on("data", (chunk: Buffer) => (received += chunk.byteLength));
  response.on("error", () => {});
  req.on("error", () => {});
  await waitFor(() => received > 128 * 1024, "streamed bytes to arrive");
  return { destroy: () => req.destroy() };
}

async function startUpload(port: number, at: string): Promise<{ destroy(): void }> {
  const req = request({ host: "127.0.0.1", port, path: at, method: "POST", agent: false, headers: { "transfer-encoding": "chunked" } });
  req.on("error", () => {});
  req.write(Buffer.alloc(32 * 1024, 1));
  await new Promise((resolve) => setTimeout(resolve, 0));
  return { destroy: () => req.destroy() };
}

before(async () => {
  await vm.mkdir("/home/agentos", { recursive: true });
  await installIntoVm(server.root("abuse"), "home/agentos", ["ws"]);
  const output = await GuestOutput.open(vm);
  await startGuestServer(vm, output, GUEST, PORT);
  ({ path, token } = await vm.createSignedPreviewUrl(PORT));
});

describe("malformed requests", () => {
  test("malformed, overlong, encoded and look-alike tokens get the one 403 body", async () => {
    const paths = [
      "/preview/",
      "/preview//x",
      "/preview/../api/vm/abuse/actions/listProcesses",
      "/preview/%2e%2e/api",
      `/preview/${token.slice(0, 31)}/`,
      `/preview/${token}0/`,
      `/preview/${token.toUpperCase()}/`,
      `/preview/%${token.charCodeAt(0).toString(16)}${token.slice(1)}/`,
      `/preview/${"a".repeat(5000)}/`,
      "/preview/%00%00/",
      "/preview/%E4%BD%A0%E5%A5%BD/",
      "/preview/;drop%20table%20previews;/",
    ];
    for (const at of paths) {
      const response = await rawRequest(server.previewPort, { path: at });
      assert.equal(response.status, 403, `${at.slice(0, 80)}: ${response.text.slice(0, 200)}`);
      assert.equal(response.text, FORBIDDEN_BODY);
      assert.equal(response.headers["access-control-allow-origin"], "*");
    }
    // Subdomain look-alikes.
    for (const host of [`${token.slice(1)}.preview.localhost`, `x.${token}.preview.localhost`, ".preview.localhost", `${"z".repeat(63)}.preview.localhost`]) {
      const response = await rawRequest(server.previewPort, { path: "/", headers: { host: `${host}:${server.previewPort}` } });
      assert.equal(response.status, 403, host);
      assert.equal(response.text, FORBIDDEN_BODY);
    }
  });

  test("a path under a valid token stays inside the guest, whatever dots it holds", async () => {
    const response = await rawRequest(server.previewPort, { path: `${path}../../api/vm/abuse/actions/listProcesses` });
    assert.equal(response.status, 200);
    assert.deepEqual(JSON.parse(response.text), { url: "/../../api/vm/abuse/actions/listProcesses", method: "GET" });
  });

  test("request lines the HTTP parser refuses are answered with 400 and the connection closed", async () => {
    for (const line of ["GET /preview/\u0000bad/ HTTP/1.1", "GET /preview/ x y HTTP/1.1", `GET ${path} HTTP/9.9`]) {
      const reply = await new Promise<string>((resolve, reject) => {
        const socket = connect(server.previewPort, "127.0.0.1");
        let text = "";
        socket.on("data", (chunk) => (text += chunk.toString("latin1")));
        socket.on("error", reject);
        socket.on("close", () => resolve(text));
        socket.end(`${line}\r\nhost: localhost\r\n\r\n`);
      });
      assert.match(reply, /^HTTP\/1\.[01] (400|403|505)/, `${JSON.stringify(line)} → ${JSON.stringify(reply.slice(0, 60))}`);
    }
  });

  test("an over-long path or header block is refused (414/431/403), not a crash", async () => {
    // Just over Node's 16 KiB header limit, so the server has read the whole request and its answer is not lost to a reset.
    const longPath = await rawRequest(server.previewPort, { path: `${path}${"p".repeat(20 * 1024)}` });
    assert.ok([414, 431, 403].includes(longPath.status), `long path: ${longPath.status}`);
    const longHeader = await rawRequest(server.previewPort, { path: `${path}echo`, headers: { "x-big": "h".repeat(20 * 1024) } });
    assert.ok([431, 403].includes(longHeader.status), `long header: ${longHeader.status}`);
    // Far over: the server stops reading, so the client may see its 431 or only the reset after it.
    for (const options of [{ path: `${path}${"p".repeat(1024 * 1024)}` }, { path: `${path}echo`, headers: { "x-big": "h".repeat(1024 * 1024) } }]) {
      const outcome = await rawRequest(server.previewPort, options).then(
        (response) => response.status,
        (error: NodeJS.ErrnoException) => error.code,
      );
      assert.ok([414, 431, 403, "ECONNRESET", "EPIPE"].includes(outcome ?? ""), `1 MiB: ${outcome}`);
    }
    assert.equal((await rawRequest(server.previewPort, { path: `${path}still-up` })).status, 200);
  });
});

describe("bodies over preview.maxBodyBytes", () => {
  test("a declared Content-Length over the cap is 413 before anything reaches the guest", async () => {
    const response = await rawRequest(server.previewPort, { method: "POST", path: `${path}upload?declared-too-big`, body: Buffer.alloc(MAX_BODY + 1, 7) });
    assert.equal(response.status, 413);
    assert.equal(response.headers["access-control-allow-origin"], "*");
    assert.match(response.text, new RegExp(String(MAX_BODY)));
    const { seen } = await stats();
    assert.ok(!seen.some((line) => line.includes("declared-too-big")), "the refused request reached the guest");
  });

  test("a chunked body that grows past the cap is cut off with 413 and the guest's side is closed", async () => {
    const req = request({ host: "127.0.0.1", port: server.previewPort, method: "POST", path: `${path}upload?chunked-too-big`, agent: false, headers: { "transfer-encoding": "chunked" } });
    const answered = responseOf(req).then(
      (response) => response.statusCode,
      (error: NodeJS.ErrnoException) => error.code,
    );
    let written = 0;
    req.on("error", () => {});
    while (written <= MAX_BODY * 2 && !req.destroyed) {
      const ok = req.write(Buffer.alloc(16 * 1024, 3));
      written += 16 * 1024;
      if (!ok) await Promise.race([new Promise((resolve) => req.once("drain", resolve)), answered]);
    }
    const status = await answered;
    // The gateway answers 413; a client still writing may see the reset that follows instead.
    assert.ok(status === 413 || status === "ECONNRESET" || status === "EPIPE", `got ${status}`);
    req.destroy();
    await settled("uploads");
  });

  test("a body exactly at the cap passes", async () => {
    const response = await rawRequest(server.previewPort, { method: "POST", path: `${path}upload`, body: Buffer.alloc(MAX_BODY, 9) });
    assert.equal(response.status, 200);
    assert.deepEqual(JSON.parse(response.text), { bytes: MAX_BODY });
  });
});

describe("clients that go away, guests that do not answer", () => {
  test("a client dropping a streaming download ends the guest's response", async () => {
    const download = await startDownload(server.previewPort, `${path}stream`);
    assert.equal((await stats()).streams, 1);
    download.destroy();
    await settled("streams");
  });

  test("a client dropping mid-upload ends the guest's request", async () => {
    const upload = await startUpload(server.previewPort, `${path}upload`);
    await waitFor(async () => (await stats()).uploads === 1, "the upload to reach the guest");
    upload.destroy();
    await settled("uploads");
  });

  test("a client dropping a WebSocket closes the guest's end", async () => {
    const socket = new WebSocket(`ws://127.0.0.1:${server.previewPort}${path}ws`);
    await new Promise((resolve, reject) => socket.once("open", resolve).once("error", reject));
    await waitFor(async () => (await stats()).sockets === 1, "the guest to see the WebSocket");
    socket.terminate();
    await settled("sockets");
  });

  test("a guest that never answers gets a 504 page after responseTimeoutMs, and its request is closed", async () => {
    const response = await fetch(`${server.previewUrl}${path}hang`);
    assert.equal(response.status, 504);
    assert.equal(response.headers.get("access-control-allow-origin"), "*");
    assert.match(response.headers.get("content-type") ?? "", /^text\/html/);
    assert.match(await response.text(), /did not/);
    await settled("hanging");
  });

  test("a client that gives up on a hung request does not leave it open in the guest", async () => {
    const controller = new AbortController();
    const pending = fetch(`${server.previewUrl}${path}hang?abandoned`, { signal: controller.signal }).catch((error: Error) => error);
    await waitFor(async () => (await stats()).hanging === 1, "the request to reach the guest");
    controller.abort();
    assert.ok((await pending) instanceof Error);
    await settled("hanging");
  });

  test("after all of the above the gateway still serves HTTP and WebSockets", async () => {
    const response = await fetch(`${server.previewUrl}${path}after/all?ok=1`);
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), { url: "/after/all?ok=1", method: "GET" });
    const socket = new WebSocket(`ws://127.0.0.1:${server.previewPort}${path}ws`);
    await new Promise((resolve, reject) => socket.once("open", resolve).once("error", reject));
    const echoed = new Promise<string>((resolve) => socket.once("message", (data: Buffer) => resolve(data.toString())));
    socket.send("still here");
    assert.equal(await echoed, "still here");
    socket.close();
    assert.equal((await fetch(`${server.url}/health`)).status, 200);
  });
});

describe("the VM's socket table after dropped clients (same gateway, embedded VM)", () => {
  let embedded: Vm;
  let gatewayServer: Server;
  let gatewayPort = 0;
  let embeddedPath = "";

  before(async () => {
    const dataDir = await tempDir();
    embedded = await createVm({ dataDir, name: "abuse-embedded", });
    onCleanup(() => embedded.dispose());
    await installIntoVm(embedded.root, "home/agentos", ["ws"]);
    await embedded.writeFile("/home/agentos/guest.cjs", GUEST);
    await embedded.spawn("node", ["guest.cjs"]);
    await waitFor(async () => (await embedded.listeningPorts()).includes(PORT), "the embedded guest to listen", 20_000);
    const sqlite = new SqliteStore(dataDir);
    onCleanup(() => sqlite.close());
    const store = new PreviewStore(sqlite);
    const gateway = new PreviewGateway({ store, responseTimeoutMs: TIMEOUT_MS, acquire: async () => ({ vm: embedded, release() {} }) });
    gatewayServer = createServer((req, res) => {
      if (!gateway.handleRequest(req, res)) res.writeHead(404).end();
    });
    gatewayServer.on("upgrade", (req, socket, head) => {
      if (!gateway.handleUpgrade(req, socket, head)) socket.destroy();
    });
    await new Promise<void>((resolve) => gatewayServer.listen(0, "127.0.0.1", resolve));
    onCleanup(() => new Promise((resolve) => gatewayServer.close(resolve)).then(() => undefined, () => undefined));
    onCleanup(() => gatewayServer.closeAllConnections());
    gatewayPort = (gatewayServer.address() as { port: number }).port;
    embeddedPath = new PreviewTokens(store, parsePreviewConfig(undefined), { definition: "", key: embedded.name }).create(PORT).path;
  });

  const connectionsSettle = () => waitFor(() => embedded.networkStats().connections === 0, () => `networkStats().connections to return to 0 (now ${JSON.stringify(embedded.networkStats())})`, 10_000, 50);

  test("connections return to 0 after a dropped download, a dropped upload, a dropped WebSocket and a 504", async () => {
    await connectionsSettle();
    const download = await startDownload(gatewayPort, `${embeddedPath}stream`);
    assert.ok(embedded.networkStats().connections >= 1, "an open download should hold a kernel connection");
    download.destroy();
    await connectionsSettle();

    const upload = await startUpload(gatewayPort, `${embeddedPath}upload`);
    await waitFor(() => embedded.networkStats().connections >= 1, "the upload to open a kernel connection");
    upload.destroy();
    await connectionsSettle();

    const socket = new WebSocket(`ws://127.0.0.1:${gatewayPort}${embeddedPath}ws`);
    await new Promise((resolve, reject) => socket.once("open", resolve).once("error", reject));
    assert.ok(embedded.networkStats().connections >= 1);
    socket.terminate();
    await connectionsSettle();

    const hung = await rawRequest(gatewayPort, { path: `${embeddedPath}hang` });
    assert.equal(hung.status, 504);
    await connectionsSettle();

    const ok = await rawRequest(gatewayPort, { path: `${embeddedPath}fine` });
    assert.equal(ok.status, 200);
    await connectionsSettle();
  });
});

describe("shutdown", () => {
  test("server.close() ends open preview WebSockets instead of waiting for them", async () => {
    const other = await startPreviewServer();
    const guestVm = other.vm("shutdown");
    await guestVm.mkdir("/home/agentos", { recursive: true });
    await installIntoVm(other.root("shutdown"), "home/agentos", ["ws"]);
    await startGuestServer(guestVm, await GuestOutput.open(guestVm), GUEST, PORT);
    const preview = await guestVm.createSignedPreviewUrl(PORT);
    const socket = new WebSocket(`ws://127.0.0.1:${other.previewPort}${preview.path}ws`);
    socket.on("error", () => {});
    await new Promise((resolve, reject) => socket.once("open", resolve).once("error", reject));
    const socketClosed = new Promise((resolve) => socket.once("close", resolve));
    let timer: NodeJS.Timeout | undefined;
    const outcome = await Promise.race([
      other.close().then(() => "closed"),
      new Promise((resolve) => (timer = setTimeout(() => resolve("still waiting after 15 s"), 15_000))),
    ]);
    clearTimeout(timer);
    assert.equal(outcome, "closed");
    await socketClosed;
  });
});
