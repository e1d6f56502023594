/**
 * The preview gateway against the real server (DESIGN §3 "Preview URLs"):
 * methods, sub-paths, query strings and headers reach the guest as if sent to
 * localhost:<port>; bodies stream both ways; Server-Sent Events arrive
 * unbuffered; WebSocket upgrades are relayed; CORS and Referrer-Policy on every
 * response; root-relative redirects and cookie paths rewritten in path mode;
 * subdomain mode; one fixed 403; a 502 page a person understands; and the
 * token never reaches the guest (a relay in the guest records every byte it
 * receives, searched at the end).
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { request } from "node:http";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import WebSocket from "ws";
import { guestApp, patternBytes, RECEIVED_LOG } from "./browser/guest-app.ts";
import { FORBIDDEN_BODY, GuestOutput, headerCount, installIntoVm, rawRequest, responseOf, startGuestServer, startPreviewServer, waitFor } from "./browser/support.ts";

const KEY = "gateway";
const PORT = 3000;
const server = await startPreviewServer();
const vm = server.vm(KEY);
/** Every token this file creates, to search the guest's received bytes for. */
const tokens: string[] = [];

async function preview(port = PORT): Promise<{ path: string; token: string }> {
  const created = await vm.createSignedPreviewUrl(port);
  tokens.push(created.token);
  return created;
}

const sha256 = (bytes: Buffer) => createHash("sha256").update(bytes).digest("hex");

let main: { path: string; token: string };
let subdomainHost: string;

before(async () => {
  await vm.mkdir("/home/agentos", { recursive: true });
  await installIntoVm(server.root(KEY), "home/agentos", ["ws"]);
  const output = await GuestOutput.open(vm);
  await startGuestServer(vm, output, guestApp(PORT), PORT);
  main = await preview();
  subdomainHost = `${main.token}.preview.localhost:${server.previewPort}`;
});

interface Echo {
  method: string;
  url: string;
  headers: Record<string, string>;
  rawHeaders: string[];
  body: string;
}

describe("HTTP through a preview (path mode)", () => {
  test("every method, sub-path and query string reaches the guest, with its body", async () => {
    for (const method of ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"]) {
      const body = ["GET", "OPTIONS"].includes(method) ? undefined : `body of ${method}`;
      const response = await rawRequest(server.previewPort, { method, path: `${main.path}echo/a/b%20c/?q=1&q=2&x=%2F`, headers: { host: `localhost:${server.previewPort}` }, ...(body ? { body } : {}) });
      assert.equal(response.status, 200, `${method}: ${response.text}`);
      const echo = JSON.parse(response.text) as Echo;
      assert.equal(echo.method, method);
      assert.equal(echo.url, "/echo/a/b%20c/?q=1&q=2&x=%2F");
      assert.equal(echo.body, body ?? "");
    }
    const head = await rawRequest(server.previewPort, { method: "HEAD", path: `${main.path}echo/head?z=9` });
    assert.equal(head.status, 200);
    assert.equal(head.headers["content-type"], "application/json");
    assert.equal(head.body.byteLength, 0);
    // The preview root, with and without the trailing slash.
    for (const path of [main.path, main.path.slice(0, -1), `${main.path.slice(0, -1)}?only=query`]) {
      const echo = JSON.parse((await rawRequest(server.previewPort, { path })).text) as Echo;
      assert.equal(echo.url, path.includes("?") ? "/?only=query" : "/");
    }
  });

  test("headers pass through; the guest sees Host: localhost:<port> and X-Forwarded-Host/-Proto/-Prefix/-For", async () => {
    const response = await rawRequest(server.previewPort, {
      method: "POST",
      path: `${main.path}echo/headers`,
      headers: {
        host: `localhost:${server.previewPort}`,
        "x-custom-one": "value 1",
        "x-multi": ["first", "second"],
        authorization: "Bearer abc.def",
        cookie: "session=s1; theme=dark",
        "content-type": "text/plain; charset=utf-8",
        "x-forwarded-for": "203.0.113.9",
        "x-forwarded-host": "spoofed.example",
        "user-agent": "preview-test/1",
      },
      body: "payload",
    });
    const echo = JSON.parse(response.text) as Echo;
    const h = echo.headers;
    assert.equal(h.host, `localhost:${PORT}`);
    assert.equal(h["x-custom-one"], "value 1");
    assert.equal(h["x-multi"], "first, second");
    assert.equal(h.authorization, "Bearer abc.def");
    assert.equal(h.cookie, "session=s1; theme=dark");
    assert.equal(h["content-type"], "text/plain; charset=utf-8");
    assert.equal(h["user-agent"], "preview-test/1");
    assert.equal(h["x-forwarded-host"], `localhost:${server.previewPort}`, "the gateway's own host, not the client's claim");
    assert.equal(h["x-forwarded-proto"], "http");
    assert.match(h["x-forwarded-for"] ?? "", /^203\.0\.113\.9, (127\.0\.0\.1|::1|::ffff:127\.0\.0\.1)$/);
    assert.ok(h["x-forwarded-prefix"]?.startsWith("/preview/"), `x-forwarded-prefix: ${h["x-forwarded-prefix"]}`);
    assert.equal(echo.body, "payload");
    assert.equal(headerCount({ rawHeaders: echo.rawHeaders }, "host"), 1);
  });

  test("Origin and Referer that carry the token are rewritten to the guest's own view", async () => {
    const echo = JSON.parse(
      (
        await rawRequest(server.previewPort, {
          path: `${main.path}echo/ref`,
          headers: { origin: `http://localhost:${server.previewPort}`, referer: `http://localhost:${server.previewPort}${main.path}page/one?tab=2` },
        })
      ).text,
    ) as Echo;
    assert.equal(echo.headers.origin, `http://localhost:${PORT}`);
    assert.equal(echo.headers.referer, `http://localhost:${PORT}/page/one?tab=2`);
    // A Referer from another preview must not reach this guest at all.
    const other = await preview(4999);
    const cross = JSON.parse((await rawRequest(server.previewPort, { path: `${main.path}echo/ref`, headers: { referer: `http://localhost:${server.previewPort}${other.path}x` } })).text) as Echo;
    assert.equal(cross.headers.referer, undefined);
    await vm.expireSignedPreviewUrl(other.token);
  });

  test("a large upload streams to the guest and a large download streams back, byte for byte", async () => {
    const size = 16 * 1024 * 1024;
    const upload = request({ host: "127.0.0.1", port: server.previewPort, method: "POST", path: `${main.path}upload`, agent: false, headers: { "content-type": "application/octet-stream" } });
    const answered = responseOf(upload);
    const hash = createHash("sha256");
    for (let offset = 0; offset < size; offset += 256 * 1024) {
      const chunk = patternBytes(offset, Math.min(256 * 1024, size - offset));
      hash.update(chunk);
      if (!upload.write(chunk)) await new Promise((resolve) => upload.once("drain", resolve));
    }
    upload.end();
    const uploadResponse = await answered;
    const chunks: Buffer[] = [];
    for await (const chunk of uploadResponse) chunks.push(chunk as Buffer);
    assert.equal(uploadResponse.statusCode, 200);
    assert.deepEqual(JSON.parse(Buffer.concat(chunks).toString()), { bytes: size, sha256: hash.digest("hex") });

    const download = await fetch(`${server.previewUrl}${main.path}download?bytes=${size}`);
    assert.equal(download.status, 200);
    assert.equal(download.headers.get("content-length"), String(size));
    const body = Buffer.from(await download.arrayBuffer());
    assert.equal(body.byteLength, size);
    assert.equal(sha256(body), sha256(patternBytes(0, size)));
  });

  test("request and response bodies stream at the same time (each echo arrives before the next chunk is sent)", async () => {
    const req = request({ host: "127.0.0.1", port: server.previewPort, method: "POST", path: `${main.path}duplex`, agent: false, headers: { "content-type": "text/plain" } });
    const responding = responseOf(req);
    req.write("ping-0\n");
    const response = await responding;
    let received = "";
    response.on("data", (chunk: Buffer) => (received += chunk.toString()));
    for (let i = 0; i < 5; i++) {
      await waitFor(() => received.includes(`ping-${i}\n`), `echo of ping-${i} while the request is still open (got ${JSON.stringify(received)})`, 10_000);
      req.write(`ping-${i + 1}\n`);
    }
    req.end();
    await new Promise((resolve) => response.once("end", resolve));
    assert.equal(received, [0, 1, 2, 3, 4, 5].map((i) => `ping-${i}\n`).join(""));
  });

  test("Server-Sent Events are not buffered: the first event arrives while the response is still open", async () => {
    const response = await fetch(`${server.previewUrl}${main.path}sse`, { headers: { accept: "text/event-stream" } });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/event-stream");
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    while (!text.includes("data: first\n\n")) {
      const { value, done } = await reader.read();
      assert.ok(!done, `the stream ended before the first event: ${JSON.stringify(text)}`);
      text += value;
    }
    // The guest holds the response open until released, so the event above came through unbuffered.
    assert.ok(!text.includes("last"));
    const released = (await (await fetch(`${server.previewUrl}${main.path}sse-release`)).json()) as { released: number };
    assert.equal(released.released, 1);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
    }
    assert.equal(text, "data: first\n\ndata: last\n\n");
  });

  test("root-relative and localhost Location headers and cookie paths are rewritten under the preview prefix", async () => {
    const prefix = main.path.slice(0, -1);
    const cases: [string, string][] = [
      ["/login?next=/x", `${prefix}/login?next=/x`],
      [`http://localhost:${PORT}/after`, `${prefix}/after`],
      ["https://example.com/elsewhere", "https://example.com/elsewhere"],
      ["relative/path", "relative/path"],
      ["//cdn.example/x", "//cdn.example/x"],
    ];
    for (const [to, expected] of cases) {
      const response = await rawRequest(server.previewPort, { path: `${main.path}redirect?to=${encodeURIComponent(to)}` });
      assert.equal(response.status, 302);
      assert.equal(response.headers.location, expected, `Location ${to}`);
    }
    const cookies = await rawRequest(server.previewPort, { path: `${main.path}cookies` });
    assert.deepEqual(cookies.headers["set-cookie"], [`a=1; Path=${prefix}/; HttpOnly`, `b=2; Path=${prefix}/app`, "c=3"]);
  });

  test("Referrer-Policy: no-referrer, and guest CORS headers are replaced by the gateway's, not duplicated", async () => {
    const plain = await rawRequest(server.previewPort, { path: `${main.path}echo/x`, headers: { origin: "http://elsewhere.example" } });
    assert.equal(plain.headers["access-control-allow-origin"], "*");
    assert.equal(plain.headers["referrer-policy"], "no-referrer");

    const cors = await rawRequest(server.previewPort, { path: `${main.path}cors`, headers: { origin: "http://elsewhere.example" } });
    assert.equal(cors.status, 200);
    assert.equal(headerCount(cors, "access-control-allow-origin"), 1);
    assert.equal(cors.headers["access-control-allow-origin"], "*");
    assert.equal(cors.headers["access-control-allow-credentials"], undefined, "credentials with * is invalid; the guest's value must go");
    assert.notEqual(cors.headers["access-control-expose-headers"], "x-secret");
    assert.equal(headerCount(cors, "referrer-policy"), 1);
    assert.equal(cors.headers["referrer-policy"], "no-referrer");
  });

  test("a CORS preflight is answered by the gateway (204, PATCH, the requested headers, max-age) and never reaches the guest", async () => {
    const marker = `preflight-${Date.now()}`;
    const response = await rawRequest(server.previewPort, {
      method: "OPTIONS",
      path: `${main.path}${marker}`,
      headers: { origin: "http://elsewhere.example", "access-control-request-method": "PATCH", "access-control-request-headers": "x-custom-one, content-type" },
    });
    assert.equal(response.status, 204);
    assert.equal(response.headers["access-control-allow-origin"], "*");
    const methods = String(response.headers["access-control-allow-methods"]).split(/,\s*/);
    for (const method of ["GET", "POST", "PUT", "PATCH", "DELETE"]) assert.ok(methods.includes(method), `allow-methods ${methods}`);
    const allowed = String(response.headers["access-control-allow-headers"]).toLowerCase();
    assert.ok(allowed.includes("x-custom-one") && allowed.includes("content-type"), `allow-headers ${allowed}`);
    assert.ok(Number(response.headers["access-control-max-age"]) > 0, `max-age ${response.headers["access-control-max-age"]}`);
    const log = (await (await fetch(`${server.previewUrl}${main.path}log`)).json()) as string[];
    assert.ok(!log.some((line) => line.includes(marker)), `the preflight reached the guest: ${log.filter((line) => line.startsWith("OPTIONS"))}`);
  });
});

describe("subdomain mode", () => {
  test("<token>.preview.localhost:<port> serves the guest at /, with the token out of Host, Origin and Referer", async () => {
    const response = await rawRequest(server.previewPort, {
      method: "POST",
      path: "/echo/sub?k=v",
      headers: { host: subdomainHost, origin: `http://${subdomainHost}`, referer: `http://${subdomainHost}/from/here?a=1`, "x-custom-one": "sub" },
      body: "sub-body",
    });
    assert.equal(response.status, 200, response.text);
    assert.equal(response.headers["access-control-allow-origin"], "*");
    const echo = JSON.parse(response.text) as Echo;
    assert.equal(echo.url, "/echo/sub?k=v");
    assert.equal(echo.body, "sub-body");
    assert.equal(echo.headers.host, `localhost:${PORT}`);
    assert.equal(echo.headers.origin, `http://localhost:${PORT}`);
    assert.equal(echo.headers.referer, `http://localhost:${PORT}/from/here?a=1`);
    assert.equal(echo.headers["x-custom-one"], "sub");
    assert.equal(echo.headers["x-forwarded-host"], `preview.localhost:${server.previewPort}`);
    assert.equal(echo.headers["x-forwarded-prefix"], "/");
  });

  test("root-relative Location and cookie paths are left alone; cookies lose Domain= so they stay host-only (one preview's cookie never reaches another's)", async () => {
    const redirect = await rawRequest(server.previewPort, { path: `/redirect?to=${encodeURIComponent("/login")}`, headers: { host: subdomainHost } });
    assert.equal(redirect.status, 302);
    assert.equal(redirect.headers.location, "/login");
    const cookies = await rawRequest(server.previewPort, { path: "/cookies", headers: { host: subdomainHost } });
    assert.deepEqual(cookies.headers["set-cookie"], ["a=1; Path=/; HttpOnly", "b=2; Path=/app", "c=3"]);
  });

  test("an unknown subdomain token gets the same 403 as path mode", async () => {
    const response = await rawRequest(server.previewPort, { path: "/", headers: { host: `${"a".repeat(32)}.preview.localhost:${server.previewPort}` } });
    assert.equal(response.status, 403);
    assert.equal(response.text, FORBIDDEN_BODY);
    assert.equal(response.headers["access-control-allow-origin"], "*");
  });
});

describe("WebSocket upgrades", () => {
  async function open(url: string, headers: Record<string, string> = {}): Promise<{ socket: WebSocket; hello: { url: string; headers: Record<string, string> }; next(): Promise<{ data: Buffer; binary: boolean }> }> {
    const socket = new WebSocket(url, { headers });
    const queue: { data: Buffer; binary: boolean }[] = [];
    const waiters: ((message: { data: Buffer; binary: boolean }) => void)[] = [];
    socket.on("message", (data: Buffer, binary: boolean) => {
      const message = { data, binary };
      const waiter = waiters.shift();
      if (waiter) waiter(message);
      else queue.push(message);
    });
    const next = () =>
      new Promise<{ data: Buffer; binary: boolean }>((resolve, reject) => {
        const queued = queue.shift();
        if (queued) return resolve(queued);
        waiters.push(resolve);
        socket.once("error", reject);
        socket.once("close", () => reject(new Error("socket closed")));
      });
    await new Promise<void>((resolve, reject) => {
      socket.once("open", () => resolve());
      socket.once("error", reject);
      socket.once("unexpected-response", (_req, res) => reject(new Error(`upgrade refused with ${res.statusCode}`)));
    });
    const hello = JSON.parse((await next()).data.toString()) as { url: string; headers: Record<string, string> };
    return { socket, hello, next };
  }

  async function close(socket: WebSocket): Promise<void> {
    if (socket.readyState === WebSocket.CLOSED) return;
    await new Promise((resolve) => {
      socket.once("close", resolve);
      socket.close();
    });
  }

  test("path mode: the upgrade reaches the guest with its path and query, Host localhost:<port>, and echoes text and binary", async (t) => {
    const { socket, hello, next } = await open(`ws://127.0.0.1:${server.previewPort}${main.path}socket/path?room=7`, { origin: `http://localhost:${server.previewPort}` });
    t.after(() => socket.terminate());
    assert.equal(hello.url, "/socket/path?room=7");
    assert.equal(hello.headers.host, `localhost:${PORT}`);
    assert.equal(hello.headers.origin, `http://localhost:${PORT}`);
    assert.equal(hello.headers["x-forwarded-host"], `127.0.0.1:${server.previewPort}`, "the Host the client used");
    assert.ok(["ws", "http"].includes(hello.headers["x-forwarded-proto"] ?? ""), `x-forwarded-proto ${hello.headers["x-forwarded-proto"]}`);
    assert.ok(hello.headers["x-forwarded-for"], "x-forwarded-for");
    assert.ok(hello.headers["x-forwarded-prefix"]?.startsWith("/preview/"));

    socket.send("hello over the preview");
    const text = await next();
    assert.equal(text.binary, false);
    assert.equal(text.data.toString(), "hello over the preview");
    const big = patternBytes(0, 1024 * 1024);
    socket.send(big);
    const binary = await next();
    assert.equal(binary.binary, true);
    assert.equal(sha256(binary.data), sha256(big));
    await close(socket);
  });

  test("subdomain mode: the upgrade reaches the guest with Host localhost:<port>", async (t) => {
    const { socket, hello, next } = await open(`ws://127.0.0.1:${server.previewPort}/sub-socket`, { host: subdomainHost, origin: `http://${subdomainHost}` });
    t.after(() => socket.terminate());
    assert.equal(hello.url, "/sub-socket");
    assert.equal(hello.headers.host, `localhost:${PORT}`);
    assert.equal(hello.headers.origin, `http://localhost:${PORT}`);
    socket.send("sub");
    assert.equal((await next()).data.toString(), "sub");
    await close(socket);
  });

  test("an upgrade with an unknown, revoked or malformed token is refused with 403", async () => {
    const revoked = await preview();
    await vm.expireSignedPreviewUrl(revoked.token);
    for (const path of [`/preview/${"b".repeat(32)}/`, revoked.path, "/preview/not-a-token/"]) {
      const error = await open(`ws://127.0.0.1:${server.previewPort}${path}`).then(
        () => undefined,
        (failure: Error) => failure,
      );
      assert.match(String(error?.message), /403/, `${path}: ${error?.message}`);
    }
  });
});

describe("refusals", () => {
  test("unknown, revoked, expired and malformed tokens all get one fixed 403 body, with CORS", async () => {
    const revoked = await preview();
    await vm.expireSignedPreviewUrl(revoked.token);
    const expired = await vm.createSignedPreviewUrl(PORT, 0.2);
    tokens.push(expired.token);
    await waitFor(() => Date.now() > expired.expiresAt + 20, "the token to expire", 5_000);
    const paths = [`/preview/${"c".repeat(32)}/`, revoked.path, `${expired.path}x?y=1`, "/preview/short/", `/preview/${main.token.toUpperCase()}/`, "/preview//", `/preview/${main.token}x/`];
    const responses = await Promise.all(paths.map((path) => rawRequest(server.previewPort, { method: "POST", path, body: "ignored" })));
    for (const [index, response] of responses.entries()) {
      assert.equal(response.status, 403, `${paths[index]}`);
      assert.equal(response.text, FORBIDDEN_BODY, `${paths[index]}`);
      assert.equal(response.headers["access-control-allow-origin"], "*");
      assert.equal(response.headers["content-type"], responses[0]!.headers["content-type"]);
    }
  });

  test("a token that has served requests stops at once when revoked: by token, by prefix, or all of a port", async () => {
    const byToken = await preview();
    const byPrefix = await preview();
    const byPort = await preview();
    const served = async (path: string) => (await rawRequest(server.previewPort, { path })).status;
    for (const token of [byToken, byPrefix, byPort]) assert.equal(await served(token.path), 200);
    assert.equal(await vm.expireSignedPreviewUrl(byToken.token), true);
    assert.equal(await served(byToken.path), 403);
    assert.equal(await vm.expireSignedPreviewUrl(byPrefix.token.slice(0, 6)), true);
    assert.equal(await served(byPrefix.path), 403);
    assert.equal(await served(byPort.path), 200);
    await vm.expireAllPreviewUrls(PORT);
    assert.equal(await served(byPort.path), 403);
    assert.equal(await served(main.path), 403);
    // main is used by other tests in this file: give it back.
    main = await preview();
  });

  test("nothing listening on the port is a 502 page that says so, with CORS", async () => {
    const idle = await preview(3999);
    const response = await fetch(`${server.previewUrl}${idle.path}some/page`);
    assert.equal(response.status, 502);
    assert.match(response.headers.get("content-type") ?? "", /^text\/html/);
    assert.equal(response.headers.get("access-control-allow-origin"), "*");
    const page = await response.text();
    assert.match(page, /Nothing is listening/);
    assert.match(page, /3999/);
    assert.ok(!page.includes(idle.token));
  });
});

// Last, so that it sees the traffic of every test above.
test("the token never reaches the guest: not in any byte the guest received on any connection above", async () => {
  const received = await readFile(join(server.root(KEY), RECEIVED_LOG.slice(1)));
  assert.ok(received.byteLength > 16 * 1024 * 1024, `the relay recorded only ${received.byteLength} bytes`);
  assert.ok(/^host: localhost:3000\r$/im.test(received.subarray(0, 4096).toString("latin1")), "the log should start with a request to localhost:3000");
  assert.ok(tokens.length >= 5);
  for (const token of tokens) {
    assert.equal(received.indexOf(token), -1, `the guest received a token (${token.slice(0, 6)}…)`);
    assert.equal(received.indexOf(token.toUpperCase()), -1, `the guest received a token in upper case (${token.slice(0, 6)}…)`);
  }
});
