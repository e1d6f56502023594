/**
 * vmFetch end to end: host HTTP/1.1 into a real guest server through the VM's
 * socket table (DESIGN §3 "vmFetch").
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import type { Vm } from "agentvm";
import { rejection, tempDataDir, testVm, text, waitFor } from "./helpers.ts";
import { startGuest } from "./vm-network-support.ts";

const PORT = 3000;
const dataDir = await tempDataDir("agentvm-fetch-");
const vm: Vm = await testVm(dataDir, { name: "fetch-vm" });

/** One guest server for the whole file; the path picks the behaviour. */
await startGuest(
  vm,
  `const http = require("http");
  let connections = 0;
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      switch (url.pathname) {
        case "/hang":
          return; // never answers
        case "/stall":
          res.writeHead(200, { "content-length": "1000" });
          return res.write("the first bytes, then nothing"); // never finishes
        case "/connections":
          return res.end(String(connections));
        case "/binary":
          res.setHeader("content-type", "application/octet-stream");
          return res.end(body);
        case "/chunked": {
          const parts = ["alpha ", "beta ", "gamma ", "delta"];
          const next = () => {
            const part = parts.shift();
            if (part === undefined) return res.end();
            res.write(part);
            setTimeout(next, 5);
          };
          return next();
        }
        case "/status":
          res.statusCode = Number(url.searchParams.get("code"));
          res.statusMessage = "Custom Reason";
          return res.end();
        default:
          res.setHeader("content-type", "application/json");
          res.setHeader("x-echo-method", req.method);
          res.setHeader("set-cookie", ["a=1; Path=/", "b=2; Path=/"]);
          res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers, body: body.toString("utf8"), length: body.length }));
      }
    });
  });
  server.on("connection", () => connections++);
  server.listen(${PORT}, () => console.log("echo up"));`,
  /echo up/,
);

async function echo(path: string, init?: Parameters<Vm["vmFetch"]>[2]) {
  const response = await vm.vmFetch(PORT, path, init);
  return { response, echoed: JSON.parse(text(response.body)) as { method: string; url: string; headers: Record<string, string>; body: string; length: number } };
}

describe("request line", () => {
  test("relative paths: '/', 'x', nested paths and query strings reach the guest as written", async () => {
    const cases: [string, string][] = [
      ["/", "/"],
      ["x", "/x"],
      ["/a/b/c", "/a/b/c"],
      ["/search?q=hello%20world&n=1", "/search?q=hello%20world&n=1"],
      ["x?y=z", "/x?y=z"],
      ["/?", "/?"],
      ["/café/ü?q=é", "/caf%C3%A9/%C3%BC?q=%C3%A9"],
      ["http://localhost:3000/full?q=1", "/full?q=1"],
    ];
    for (const [path, expected] of cases) {
      const { response, echoed } = await echo(path);
      assert.equal(response.status, 200, path);
      assert.equal(echoed.url, expected, path);
    }
  });

  test("methods: GET, POST, PUT, PATCH, DELETE, OPTIONS (any case) and HEAD", async () => {
    for (const method of ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "patch"]) {
      const { response, echoed } = await echo("/m", { method });
      assert.equal(echoed.method, method.toUpperCase());
      assert.equal(response.headers["x-echo-method"], method.toUpperCase());
    }
    const head = await vm.vmFetch(PORT, "/m", { method: "HEAD" });
    assert.equal(head.status, 200);
    assert.equal(head.headers["x-echo-method"], "HEAD");
    assert.equal(head.body.byteLength, 0);
  });

  test("status codes and reason phrases come back as the guest set them", async () => {
    for (const code of [201, 204, 302, 404, 500, 503]) {
      const response = await vm.vmFetch(PORT, `/status?code=${code}`);
      assert.equal(response.status, code);
      assert.equal(response.statusText, "Custom Reason");
    }
  });
});

describe("headers", () => {
  test("request headers reach the guest, from a record, an array or a Headers object", async () => {
    const forms = [
      { "X-Custom": "one", Authorization: "Bearer t0k3n", Accept: "text/plain" },
      [["X-Custom", "one"], ["Authorization", "Bearer t0k3n"], ["Accept", "text/plain"]] as [string, string][],
      new Headers({ "X-Custom": "one", Authorization: "Bearer t0k3n", Accept: "text/plain" }),
    ];
    for (const headers of forms) {
      const { echoed } = await echo("/h", { headers });
      assert.equal(echoed.headers["x-custom"], "one");
      assert.equal(echoed.headers.authorization, "Bearer t0k3n");
      assert.equal(echoed.headers.accept, "text/plain");
      assert.equal(echoed.headers.host, `localhost:${PORT}`);
    }
  });

  test("a Host header set by the caller is kept", async () => {
    const { echoed } = await echo("/h", { headers: { Host: "app.example.test" } });
    assert.equal(echoed.headers.host, "app.example.test");
  });

  test("response headers come back lower-cased, repeated ones kept", async () => {
    const { response } = await echo("/h");
    assert.equal(response.headers["content-type"], "application/json");
    assert.equal(response.headers["x-echo-method"], "GET");
    const cookies = response.headers["set-cookie"] ?? "";
    assert.match(cookies, /a=1; Path=\//);
    assert.match(cookies, /b=2; Path=\//);
  });
});

describe("bodies", () => {
  test("POST JSON as in the seed", async () => {
    const { response, echoed } = await echo("/api/data", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key: "value" }),
    });
    assert.equal(response.status, 200);
    assert.equal(echoed.method, "POST");
    assert.equal(echoed.headers["content-type"], "application/json");
    assert.equal(echoed.headers["content-length"], String(JSON.stringify({ key: "value" }).length));
    assert.deepEqual(JSON.parse(echoed.body), { key: "value" });
  });

  test("binary bodies both ways keep all 256 byte values (Uint8Array, ArrayBuffer, Buffer)", async () => {
    const bytes = new Uint8Array(256 * 4);
    for (let i = 0; i < bytes.length; i++) bytes[i] = i % 256;
    for (const body of [bytes, bytes.buffer.slice(0), Buffer.from(bytes)]) {
      const response = await vm.vmFetch(PORT, "/binary", { method: "POST", body });
      assert.equal(response.headers["content-type"], "application/octet-stream");
      assert.ok(response.body instanceof Uint8Array);
      assert.deepEqual(new Uint8Array(response.body), bytes);
    }
  });

  test("a UTF-8 string body is sent as UTF-8 with the right length", async () => {
    const body = "héllo wörld — ✓ 🚀";
    const { echoed } = await echo("/utf8", { method: "POST", body });
    assert.equal(echoed.body, body);
    assert.equal(echoed.length, Buffer.byteLength(body));
  });

  test("streamed request bodies: a ReadableStream and an async iterable", async () => {
    const parts = ["one ", "two ", "three"];
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const part of parts) controller.enqueue(new TextEncoder().encode(part));
        controller.close();
      },
    });
    const fromStream = await echo("/s", { method: "POST", body: stream });
    assert.equal(fromStream.echoed.body, "one two three");
    assert.equal(fromStream.echoed.headers["transfer-encoding"], "chunked");
    async function* generate() {
      for (const part of parts) yield new TextEncoder().encode(part);
    }
    const fromIterable = await echo("/s", { method: "PUT", body: generate() });
    assert.equal(fromIterable.echoed.body, "one two three");
  });

  test("chunked responses (no content-length) arrive whole", async () => {
    const response = await vm.vmFetch(PORT, "/chunked");
    assert.equal(response.headers["transfer-encoding"], "chunked");
    assert.equal(response.headers["content-length"], undefined);
    assert.equal(text(response.body), "alpha beta gamma delta");
  });

  test("vmFetchStream returns the body as a ReadableStream, chunk by chunk", async () => {
    const response = await vm.vmFetchStream(PORT, "/chunked");
    assert.equal(response.status, 200);
    assert.ok(response.body instanceof ReadableStream);
    const reader = response.body.getReader();
    const chunks: string[] = [];
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(text(value));
    }
    assert.equal(chunks.join(""), "alpha beta gamma delta");
    assert.ok(chunks.length >= 2, `expected the chunks to stream separately, got ${JSON.stringify(chunks)}`);
  });
});

describe("connections", () => {
  test("keep-alive: many sequential requests reuse a few connections", async () => {
    const before = Number(text((await vm.vmFetch(PORT, "/connections")).body));
    for (let i = 0; i < 60; i++) {
      const { echoed } = await echo(`/seq/${i}`);
      assert.equal(echoed.url, `/seq/${i}`);
    }
    const afterCount = Number(text((await vm.vmFetch(PORT, "/connections")).body));
    assert.ok(afterCount - before <= 2, `60 sequential requests opened ${afterCount - before} connections`);
  });

  test("concurrent requests all get their own answers", async () => {
    const results = await Promise.all(Array.from({ length: 24 }, (_, i) => echo(`/par/${i}`)));
    results.forEach(({ echoed }, i) => assert.equal(echoed.url, `/par/${i}`));
  });

  test("a guest that closes an idle keep-alive connection (FIN or reset): the next vmFetch uses a new one", async () => {
    // A VM of its own, so its connection count is this test's alone.
    const own = await testVm(dataDir, { name: "fetch-idle-close" });
    await startGuest(
      own,
      `let n = 0;
      require("net").createServer((socket) => {
        const id = ++n;
        socket.once("data", (request) => {
          const mode = request.toString().split(" ")[1];
          socket.write("HTTP/1.1 200 OK\\r\\ncontent-length: 7\\r\\nconnection: keep-alive\\r\\n\\r\\nconn " + String(id).padStart(2, "0"));
          setTimeout(() => (mode === "/fin" ? socket.end() : socket.destroy()), 30);
        });
      }).listen(3000, () => console.log("raw up"));`,
      /raw up/,
    );
    for (const [i, mode] of ["/fin", "/reset", "/fin"].entries()) {
      const response = await own.vmFetch(3000, mode, { timeoutMs: 5000 });
      assert.equal(text(response.body), `conn ${String(i + 1).padStart(2, "0")}`, mode);
      await waitFor(() => own.networkStats().connections === 0, `the ${mode} connection to close on both sides`);
    }
  });

  test("nothing listening: rejects with ECONNREFUSED naming the port and the VM", async () => {
    const error = await rejection(vm.vmFetch(3999, "/"));
    assert.equal(error.code, "ECONNREFUSED");
    assert.match(error.message, /3999/);
    assert.match(error.message, /fetch-vm/);
  });

  test("a guest that never answers: timeoutMs fails with ETIMEDOUT, and the server keeps serving", async () => {
    const error = await rejection(vm.vmFetch(PORT, "/hang", { timeoutMs: 300 }));
    assert.equal(error.code, "ETIMEDOUT");
    assert.match(error.message, /3000/);
    const { echoed } = await echo("/after-timeout");
    assert.equal(echoed.url, "/after-timeout");
  });

  test("a body that stalls: timeoutMs fails vmFetch and a vmFetchStream read with ETIMEDOUT", async () => {
    const error = await rejection(vm.vmFetch(PORT, "/stall", { timeoutMs: 300 }));
    assert.equal(error.code, "ETIMEDOUT", error.message);
    const response = await vm.vmFetchStream(PORT, "/stall", { timeoutMs: 300 });
    assert.equal(response.status, 200);
    const reader = response.body.getReader();
    const streamError = await rejection(async () => {
      for (;;) if ((await reader.read()).done) return;
    });
    assert.equal(streamError.code, "ETIMEDOUT", streamError.message);
  });

  test("an AbortSignal cancels a pending request", async () => {
    const controller = new AbortController();
    const pending = vm.vmFetch(PORT, "/hang", { signal: controller.signal });
    setImmediate(() => controller.abort());
    const error = await rejection(pending);
    assert.ok(error.code === "FETCH_FAILED" || error.code === "ABORT_ERR", `code ${error.code}: ${error.message}`);
  });
});

describe("argument validation", () => {
  test("bad ports, paths and init fail with INVALID_ARGUMENT", async () => {
    const bad: [string, () => Promise<unknown>][] = [
      ["port 0", () => vm.vmFetch(0, "/")],
      ["port 70000", () => vm.vmFetch(70000, "/")],
      ["port -1", () => vm.vmFetch(-1, "/")],
      ["port 3000.5", () => vm.vmFetch(3000.5, "/")],
      ['port "3000"', () => vm.vmFetch("3000" as never, "/")],
      ["port NaN", () => vm.vmFetch(Number.NaN, "/")],
      ["path 42", () => vm.vmFetch(PORT, 42 as never)],
      ["path undefined", () => vm.vmFetch(PORT, undefined as never)],
      ["path with a space", () => vm.vmFetch(PORT, "/a b")],
      ["path with CRLF", () => vm.vmFetch(PORT, "/a\r\nX-Injected: 1")],
      ["unknown init key", () => vm.vmFetch(PORT, "/", { methd: "POST" } as never)],
      ["init not an object", () => vm.vmFetch(PORT, "/", "POST" as never)],
      ["header value with CRLF", () => vm.vmFetch(PORT, "/", { headers: { "X-A": "1\r\nX-Injected: 1" } })],
      ["header name with a space", () => vm.vmFetch(PORT, "/", { headers: { "X A": "1" } })],
      ["header value not a string", () => vm.vmFetch(PORT, "/", { headers: { "X-A": { nested: true } } as never })],
      ["method with a space", () => vm.vmFetch(PORT, "/", { method: "GE T" })],
      ["body a number", () => vm.vmFetch(PORT, "/", { method: "POST", body: 42 as never })],
      ["timeoutMs negative", () => vm.vmFetch(PORT, "/", { timeoutMs: -5 })],
      ["timeoutMs Infinity", () => vm.vmFetch(PORT, "/", { timeoutMs: Infinity })],
      ["signal not an AbortSignal", () => vm.vmFetch(PORT, "/", { signal: 5 as never })],
      ["header value outside Latin-1", () => vm.vmFetch(PORT, "/", { headers: { "X-A": "🚀" } })],
      ["path with a lone surrogate", () => vm.vmFetch(PORT, "/\ud800")],
    ];
    for (const [what, call] of bad) {
      let promise: Promise<unknown>;
      try {
        promise = call();
      } catch (error) {
        assert.fail(`${what}: threw synchronously instead of rejecting: ${(error as Error).message}`);
      }
      const error = await rejection(promise);
      assert.equal(error.code, "INVALID_ARGUMENT", `${what}: ${error.code} ${error.message}`);
    }
    // The server saw none of them as requests and still answers.
    const { echoed } = await echo("/still-fine");
    assert.equal(echoed.url, "/still-fine");
  });
});
