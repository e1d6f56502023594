/**
 * Previews live on their own origin, never the API's (DESIGN §3, issue 10
 * "Origins"), proved with the real server and headless Chromium:
 *
 * - a page served from VM A's preview cannot read VM B's files or write into
 *   it through the API: its origin is not the API's, so the API refuses it;
 * - a preview path sent to the API origin is redirected (307) to the preview
 *   origin, for fetch GET and POST and for browser navigations and form posts;
 *   a WebSocket upgrade there is refused with 421 naming the preview origin;
 * - createSignedPreviewUrl returns `url`, on the preview origin, and it answers;
 * - in subdomain mode a cookie set with `Domain=` stays on its own preview.
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import type { Browser } from "playwright-core";
import { browserSkip, GuestOutput, launchChromium, newPage, rawRequest, startGuestServer, startPreviewServer, type PreviewServer } from "./browser/support.ts";

const PORT = 3000;
const SECRET = "the victim's secret";
/** How the API carries the bytes readFile returns. */
const SECRET_BASE64 = Buffer.from(SECRET).toString("base64");

/** The guest in both VMs: an attack page (given the API URL), a cookie setter and an echo. */
function guest(apiUrl: string): string {
  return `
const http = require("http");
const ATTACK = \`<!doctype html><html><body><pre id="out">pending</pre><script>
  (async () => {
    const api = ${JSON.stringify(apiUrl)};
    const out = { origin: location.origin };
    try {
      const response = await fetch(api + "/api/vm/victim/actions/readFile", {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(["/home/agentos/secret.txt", "utf8"]),
      });
      out.read = "status " + response.status + ": " + (await response.text());
    } catch (error) { out.read = "error: " + error.name; }
    try {
      // A simple request: no preflight, so the API's own checks are what stop it.
      await fetch(api + "/api/vm/victim/actions/writeFile", {
        method: "POST", mode: "no-cors", headers: { "content-type": "text/plain" }, body: JSON.stringify(["/home/agentos/pwned.txt", "x"]),
      });
      out.write = "sent";
    } catch (error) { out.write = "error: " + error.name; }
    document.getElementById("out").textContent = JSON.stringify(out);
  })();
</script></body></html>\`;
http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    if (req.url === "/attack") {
      res.setHeader("content-type", "text/html; charset=utf-8");
      return res.end(ATTACK);
    }
    if (req.url === "/set-cookie") {
      res.setHeader("set-cookie", ["shared=leaked; Domain=preview.localhost; Path=/", "own=kept; Path=/"]);
      return res.end("cookies set");
    }
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ method: req.method, url: req.url, body: Buffer.concat(chunks).toString(), cookie: req.headers.cookie || null }));
  });
}).listen(${PORT});
`;
}

interface Echo {
  method: string;
  url: string;
  body: string;
  cookie: string | null;
}

describe("preview origins", () => {
  let server: PreviewServer;
  let attackerPath = "";
  let victimPath = "";
  let attackerToken = "";
  let victimToken = "";

  before(async () => {
    server = await startPreviewServer();
    for (const key of ["attacker", "victim"]) {
      const vm = server.vm(key);
      await vm.mkdir("/home/agentos", { recursive: true });
      await startGuestServer(vm, await GuestOutput.open(vm), guest(server.url), PORT);
    }
    await server.vm("victim").writeFile("/home/agentos/secret.txt", SECRET);
    const attacker = await server.vm("attacker").createSignedPreviewUrl(PORT);
    const victim = await server.vm("victim").createSignedPreviewUrl(PORT);
    attackerPath = attacker.path;
    attackerToken = attacker.token;
    victimPath = victim.path;
    victimToken = victim.token;
  });

  test("the preview listener is its own origin: the API port + 1 away from nothing it shares", () => {
    assert.notEqual(server.previewPort, server.port);
    assert.notEqual(new URL(server.previewUrl).origin, new URL(server.url).origin);
  });

  test("createSignedPreviewUrl returns url on the preview origin, and it answers without a redirect", async () => {
    const preview = await server.vm("attacker").createSignedPreviewUrl(PORT, 60);
    assert.equal(preview.url, `${server.previewUrl}${preview.path}`);
    const response = await fetch(`${preview.url}direct?x=1`, { redirect: "manual" });
    assert.equal(response.status, 200);
    assert.deepEqual(((await response.json()) as Echo).url, "/direct?x=1");
  });

  test("the API origin answers a preview path with 307 to the same path on the preview origin, and serves none of it", async () => {
    const response = await rawRequest(server.port, { path: `${attackerPath}x/y?z=1`, headers: { host: `localhost:${server.port}` } });
    assert.equal(response.status, 307);
    assert.equal(response.headers.location, `${server.previewUrl}${attackerPath}x/y?z=1`);
    assert.equal(response.headers["access-control-allow-origin"], "*", "a cross-origin fetch may follow it");
    assert.ok(!response.text.includes('"method"'), "the guest's answer is not served on the API origin");
    // Even a bad token is redirected, not looked up: the API origin says nothing about tokens.
    const bad = await rawRequest(server.port, { path: `/preview/${"q".repeat(32)}/` });
    assert.equal(bad.status, 307);
  });

  test("fetch follows the redirect for GET and for POST, keeping the method and the body", async () => {
    const get = await fetch(`${server.url}${attackerPath}get?q=1`);
    assert.equal(get.status, 200);
    assert.ok(get.redirected);
    assert.equal(get.url, `${server.previewUrl}${attackerPath}get?q=1`);
    assert.deepEqual(await get.json(), { method: "GET", url: "/get?q=1", body: "", cookie: null });
    const post = await fetch(`${server.url}${attackerPath}post`, { method: "POST", headers: { "content-type": "application/json" }, body: '{"n":1}' });
    assert.equal(post.status, 200);
    assert.deepEqual(await post.json(), { method: "POST", url: "/post", body: '{"n":1}', cookie: null });
  });

  test("a CORS preflight for a preview path on the API origin is answered there (browsers do not redirect preflights)", async () => {
    const response = await rawRequest(server.port, { method: "OPTIONS", path: `${attackerPath}x`, headers: { origin: "http://elsewhere.example", "access-control-request-method": "PUT" } });
    assert.equal(response.status, 204);
    assert.equal(response.headers["access-control-allow-origin"], "*");
  });

  test("a subdomain-mode Host on the API listener is redirected to the same name on the preview port", async () => {
    const response = await rawRequest(server.port, { path: "/page?a=b", headers: { host: `${attackerToken}.preview.localhost:${server.port}` } });
    assert.equal(response.status, 307);
    assert.equal(response.headers.location, `http://${attackerToken}.preview.localhost:${server.previewPort}/page?a=b`);
  });

  test("a preview WebSocket on the API origin is refused with 421 and told where the preview origin is", async () => {
    const socket = connect(server.port, "127.0.0.1");
    socket.write(`GET ${attackerPath}ws HTTP/1.1\r\nHost: localhost:${server.port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`);
    let answer = "";
    socket.on("data", (chunk) => (answer += chunk));
    await new Promise((resolve) => socket.once("close", resolve));
    assert.match(answer, /^HTTP\/1\.1 421 /);
    assert.match(answer, new RegExp(`location: ws://localhost:${server.previewPort}${attackerPath}ws`, "i"));
  });

  test("the preview listener serves no API", async () => {
    const response = await rawRequest(server.previewPort, { method: "POST", path: "/api/vm/victim/actions/readdir", headers: { "content-type": "application/json" }, body: '["/home/agentos"]' });
    assert.equal(response.status, 404);
    assert.ok(!response.text.includes("secret"));
  });

  describe("in headless Chromium", { skip: browserSkip }, () => {
    let browser: Browser;

    before(async () => {
      browser = await launchChromium();
    });

    test("a page served from VM A's preview cannot read VM B's files or write into VM B through the API", async () => {
      // The API itself would hand the file to a caller it trusts (here, a server-side fetch).
      const direct = await fetch(`${server.url}/api/vm/victim/actions/readFile`, { method: "POST", headers: { "content-type": "application/json" }, body: '["/home/agentos/secret.txt", "utf8"]' });
      assert.equal(direct.status, 200);
      assert.ok((await direct.text()).includes(SECRET_BASE64));

      const page = await newPage(browser);
      // Opened the way the seed does it, endpoint + path: the browser ends up on the preview origin.
      await page.goto(`${server.url}${attackerPath}attack`);
      await page.waitForFunction(`document.getElementById("out").textContent !== "pending"`);
      const out = JSON.parse((await page.textContent("#out")) ?? "{}") as { origin: string; read: string; write: string };
      assert.equal(out.origin, new URL(server.previewUrl).origin, "the page is on the preview origin");
      assert.notEqual(out.origin, new URL(server.url).origin);
      assert.ok(!out.read.includes(SECRET_BASE64), `the preview page read the victim's file: ${out.read}`);
      assert.equal(out.read, "error: TypeError", "the API answers no CORS for a preview origin");
      await new Promise((resolve) => setTimeout(resolve, 200));
      assert.equal(existsSync(join(server.root("victim"), "home/agentos/pwned.txt")), false, "the no-cors write reached the victim VM");
    });

    test("a browser navigation and a form POST to the API origin land on the preview origin with the method and body kept", async () => {
      const page = await newPage(browser);
      const response = await page.goto(`${server.url}${attackerPath}nav?x=1`);
      assert.equal(response?.status(), 200);
      assert.equal(page.url(), `${server.previewUrl}${attackerPath}nav?x=1`);
      // A string, not a function: this project's TypeScript has no DOM types.
      await page.evaluate(`(() => {
        const form = document.createElement("form");
        form.method = "POST";
        form.action = ${JSON.stringify(`${server.url}${attackerPath}form`)};
        const input = document.createElement("input");
        input.name = "field";
        input.value = "value";
        form.append(input);
        document.body.append(form);
        form.submit();
      })()`);
      await page.waitForURL(`${server.previewUrl}${attackerPath}form`);
      const echo = JSON.parse((await page.textContent("body")) ?? "{}") as Echo;
      assert.equal(echo.method, "POST");
      assert.equal(echo.body, "field=value");
    });

    test("subdomain mode: a cookie a preview sets with Domain= does not reach another VM's preview", async () => {
      const page = await newPage(browser);
      const previewPort = server.previewPort;
      await page.goto(`http://${attackerToken}.preview.localhost:${previewPort}/set-cookie`);
      await page.goto(`http://${attackerToken}.preview.localhost:${previewPort}/echo`);
      const own = JSON.parse((await page.textContent("body")) ?? "{}") as Echo;
      assert.match(own.cookie ?? "", /shared=leaked/, "the cookie still works on its own preview (host-only)");
      assert.match(own.cookie ?? "", /own=kept/);
      await page.goto(`http://${victimToken}.preview.localhost:${previewPort}/echo`);
      const other = JSON.parse((await page.textContent("body")) ?? "{}") as Echo;
      assert.equal(other.cookie, null, `VM A's cookie reached VM B's preview: ${other.cookie}`);
      assert.ok(victimPath.includes(victimToken));
    });
  });
});
