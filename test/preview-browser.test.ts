/**
 * Previews in a real browser (headless Chromium through playwright-core)
 * against the real server: a page from another origin fetches a preview with a
 * custom header (so Chromium sends a CORS preflight) and reads the JSON; a
 * preview loads inside an iframe; a page served through a preview echoes over
 * a WebSocket that goes through the same preview — in path mode and in
 * subdomain mode (`<token>.preview.localhost`, which Chromium resolves to
 * loopback by itself).
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import type { Browser } from "playwright-core";
import { browserSkip, GuestOutput, installIntoVm, launchChromium, newPage, onCleanup, startGuestServer, startPreviewServer } from "./browser/support.ts";

const PORT = 3000;

/** The guest: JSON API, an HTML page that talks WebSocket to its own origin, a ws echo, and a log of methods. */
const GUEST = `
const http = require("http");
const { WebSocketServer } = require("ws");
const seen = [];
const PAGE = \`<!doctype html><html><head><meta charset="utf-8"><title>guest page</title></head><body>
<h1 id="title">Preview page from the VM</h1><p id="ws">waiting</p>
<script>
  const url = new URL("socket", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url);
  socket.onopen = () => socket.send("ping from " + location.hostname.split(".")[0].length + "-char host label");
  socket.onmessage = (event) => { document.getElementById("ws").textContent = "echo: " + event.data; };
  socket.onerror = () => { document.getElementById("ws").textContent = "websocket error"; };
</script></body></html>\`;
const server = http.createServer((req, res) => {
  seen.push(req.method + " " + req.url);
  if (req.url.startsWith("/api/data")) {
    const chunks = [];
    req.on("data", (chunk) => chunks.push(chunk));
    req.on("end", () => {
      res.setHeader("content-type", "application/json");
      res.setHeader("x-guest-header", "exposed");
      // A guest that sets its own CORS: the gateway's must win.
      res.setHeader("access-control-allow-origin", "http://nobody.example");
      res.end(JSON.stringify({ hello: "from the vm", method: req.method, custom: req.headers["x-custom"] || null, body: Buffer.concat(chunks).toString() }));
    });
    return;
  }
  if (req.url === "/log") {
    res.setHeader("content-type", "application/json");
    return res.end(JSON.stringify(seen));
  }
  res.setHeader("content-type", "text/html; charset=utf-8");
  res.end(PAGE);
});
const wss = new WebSocketServer({ server });
wss.on("connection", (socket) => socket.on("message", (data) => socket.send(String(data))));
server.listen(${PORT});
`;

describe("previews in headless Chromium", { skip: browserSkip }, () => {
  let browser: Browser;
  let previewUrl = "";
  let subdomainUrl = "";
  let hostOrigin = "";
  let serverUrl = "";

  before(async () => {
    const server = await startPreviewServer();
    serverUrl = server.url;
    const vm = server.vm("browser");
    await vm.mkdir("/home/agentos", { recursive: true });
    await installIntoVm(server.root("browser"), "home/agentos", ["ws"]);
    await startGuestServer(vm, await GuestOutput.open(vm), GUEST, PORT);
    const preview = await vm.createSignedPreviewUrl(PORT);
    previewUrl = `http://localhost:${server.port}${preview.path}`;
    subdomainUrl = `http://${preview.token}.preview.localhost:${server.port}/`;

    // A page on another origin (127.0.0.1 vs localhost, another port) that uses the preview.
    const host = createServer((req, res) => {
      res.setHeader("content-type", "text/html; charset=utf-8");
      if (req.url === "/fetch.html") {
        res.end(`<!doctype html><html><body><pre id="out">pending</pre><script>
          fetch(${JSON.stringify(`${previewUrl}api/data?from=other-origin`)}, {
            method: "PATCH",
            headers: { "x-custom": "from-the-browser", "content-type": "application/json" },
            body: JSON.stringify({ n: 1 }),
          })
            .then(async (response) => {
              const json = await response.json();
              document.getElementById("out").textContent = JSON.stringify({ status: response.status, exposed: response.headers.get("x-guest-header"), json });
            })
            .catch((error) => { document.getElementById("out").textContent = "error: " + error; });
        </script></body></html>`);
      } else if (req.url === "/iframe.html") {
        res.end(`<!doctype html><html><body><h1>host page</h1><iframe id="frame" src="${previewUrl}" width="600" height="300"></iframe></body></html>`);
      } else {
        res.statusCode = 404;
        res.end("not found");
      }
    });
    await new Promise<void>((resolve) => host.listen(0, "127.0.0.1", resolve));
    onCleanup(() => new Promise((resolve) => host.close(resolve)));
    onCleanup(() => host.closeAllConnections());
    hostOrigin = `http://127.0.0.1:${(host.address() as { port: number }).port}`;

    browser = await launchChromium();
  });

  test("(a) a page from another origin fetches the preview with a custom header (preflighted) and reads the JSON", async () => {
    const page = await newPage(browser);
    await page.goto(`${hostOrigin}/fetch.html`);
    await page.waitForFunction(`document.getElementById("out").textContent !== "pending"`);
    const out = (await page.textContent("#out")) ?? "";
    assert.ok(!out.startsWith("error"), `the cross-origin fetch failed: ${out}`);
    const result = JSON.parse(out) as { status: number; exposed: string | null; json: { hello: string; method: string; custom: string | null; body: string } };
    assert.equal(result.status, 200);
    assert.deepEqual(result.json, { hello: "from the vm", method: "PATCH", custom: "from-the-browser", body: '{"n":1}' });
    assert.equal(result.exposed, "exposed", "Access-Control-Expose-Headers should let the page read the guest's headers");
    // The preflight was answered by the gateway: the guest saw the PATCH and no OPTIONS.
    const log = (await (await fetch(`${previewUrl}log`)).json()) as string[];
    assert.ok(log.includes("PATCH /api/data?from=other-origin"), `guest log: ${log}`);
    assert.ok(!log.some((line) => line.startsWith("OPTIONS")), `a preflight reached the guest: ${log}`);
  });

  test("(b) a preview loads inside an iframe of another origin", async () => {
    const page = await newPage(browser);
    await page.goto(`${hostOrigin}/iframe.html`);
    const frame = page.frameLocator("#frame");
    assert.equal(await frame.locator("#title").textContent(), "Preview page from the VM");
    // The framed page's own WebSocket works too.
    await frame.locator("#ws", { hasText: "echo:" }).waitFor();
  });

  test("(c) a page served through a preview echoes over a WebSocket through the same preview (path mode)", async () => {
    const page = await newPage(browser);
    const response = await page.goto(previewUrl);
    assert.equal(response?.status(), 200);
    assert.equal(response?.headers()["referrer-policy"], "no-referrer");
    await page.locator("#ws", { hasText: "echo:" }).waitFor();
    // The label length in the echo is "localhost" (9): the path-mode page runs on the gateway's own host.
    assert.equal(await page.textContent("#ws"), "echo: ping from 9-char host label");
  });

  test("(c) the same page and WebSocket in subdomain mode (<token>.preview.localhost)", async () => {
    const page = await newPage(browser);
    const response = await page.goto(subdomainUrl);
    assert.equal(response?.status(), 200);
    assert.equal(await page.textContent("#title"), "Preview page from the VM");
    await page.locator("#ws", { hasText: "echo:" }).waitFor();
    // 32: the token is the first label of the page's host.
    assert.equal(await page.textContent("#ws"), "echo: ping from 32-char host label");
  });

  test("an unknown preview token shows the 403 page in the browser", async () => {
    const page = await newPage(browser);
    const server = new URL(serverUrl);
    const response = await page.goto(`http://localhost:${server.port}/preview/${"q".repeat(32)}/`);
    assert.equal(response?.status(), 403);
    assert.match((await page.textContent("body")) ?? "", /invalid, expired or revoked/);
  });
});
