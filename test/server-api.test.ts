/**
 * The server's HTTP API through the typed client (and raw fetch where the wire
 * itself is the subject), against an in-process `registry.start()` with real
 * sandboxed guests.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, realpath, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect } from "node:net";
import { after, before, describe, it } from "node:test";
import { agentOS, setup, type RunningServer } from "agentvm";
import { AgentVmError, createClient, type VmHandle } from "agentvm/client";
import { VM_ACTIONS } from "../src/actions.ts";
import { waitFor, rejection, text } from "./helpers.ts";

const registry = setup({ use: { vm: agentOS() } });
type Client = ReturnType<typeof createClient<typeof registry>>;

let dataDir: string;
let server: RunningServer;
let client: Client;

before(async () => {
  dataDir = await realpath(await mkdtemp(join(tmpdir(), "agentvm-server-api-")));
  server = await registry.start({ port: 0, dataDir, handleSignals: false });
  client = createClient<typeof registry>(server.url);
});

after(async () => {
  await server?.close();
  if (dataDir) await rm(dataDir, { recursive: true, force: true });
});

/** Fails (instead of hanging the file) when `promise` does not settle in time. */
async function settles<T>(promise: Promise<T>, what: string, timeoutMs = 15_000): Promise<PromiseSettledResult<T>> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([Promise.allSettled([promise]).then(([result]) => result!), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function listening(handle: VmHandle, port: number): Promise<void> {
  await waitFor(async () => {
    try {
      await handle.vmFetch(port, "/ping");
      return true;
    } catch (error) {
      if ((error as AgentVmError).code === "ECONNREFUSED") return false;
      throw error;
    }
  }, `a guest server on port ${port}`);
}

/** POST an action with raw fetch. */
function rawAction(key: string, action: string, body: string | Uint8Array, headers: Record<string, string> = { "content-type": "application/json" }) {
  return fetch(`${server.url}/api/vm/${encodeURIComponent(key)}/actions/${action}`, { method: "POST", headers, body });
}

/** Guest server used by the fetch tests: echo, held-open stream, big body. */
const GUEST_SERVER = `
const http = require("http");
const held = [];
http.createServer((req, res) => {
  if (req.url === "/stream") {
    res.writeHead(200, { "content-type": "text/plain" });
    res.write("first-chunk\\n");
    held.push(res);
    return;
  }
  if (req.url === "/release") {
    for (const r of held.splice(0)) r.end("last-chunk\\n");
    res.end("released");
    return;
  }
  if (req.url === "/never") return; // never answers
  if (req.url === "/cut") {
    res.writeHead(200, { "content-type": "text/plain", "content-length": "1000" });
    res.write("partial");
    setImmediate(() => res.socket.destroy());
    return;
  }
  if (req.url.startsWith("/big/")) {
    const total = Number(req.url.slice(5));
    res.writeHead(200, { "content-type": "application/octet-stream" });
    const chunk = Buffer.alloc(65536, 7);
    let sent = 0;
    const pump = () => {
      while (sent < total) {
        const n = Math.min(chunk.length, total - sent);
        sent += n;
        if (!res.write(n === chunk.length ? chunk : chunk.subarray(0, n))) return res.once("drain", pump);
      }
      res.end();
    };
    return pump();
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    res.writeHead(201, "Made It", { "content-type": "application/octet-stream", "x-method": req.method, "x-url": req.url, "x-headers": JSON.stringify(req.headers) });
    res.end(body);
  });
}).listen(3000);
`;

describe("files", () => {
  let vm: VmHandle;
  before(() => {
    vm = client.vm.getOrCreate("files");
  });

  it("writeFile (string) and readFile → Uint8Array", async () => {
    await vm.writeFile("/home/agentos/hello.txt", "héllo wörld");
    const bytes = await vm.readFile("/home/agentos/hello.txt");
    assert.ok(bytes instanceof Uint8Array);
    assert.equal(text(bytes), "héllo wörld");
  });

  it("binary round trip: all 256 byte values", async () => {
    const all = Uint8Array.from({ length: 512 }, (_, i) => (i * 7 + 3) % 256);
    assert.equal(new Set(all).size, 256);
    await vm.writeFile("/home/agentos/bytes.bin", all);
    const back = await vm.readFile("/home/agentos/bytes.bin");
    assert.deepEqual([...back], [...all]);
    assert.equal((await vm.stat("/home/agentos/bytes.bin")).size, 512);
  });

  it("a 20 MiB file round-trips intact", async () => {
    const big = randomBytes(20 * 1024 * 1024);
    await vm.writeFile("/home/agentos/big.bin", big);
    const back = await vm.readFile("/home/agentos/big.bin");
    assert.equal(back.byteLength, big.byteLength);
    assert.equal(createHash("sha256").update(back).digest("hex"), createHash("sha256").update(big).digest("hex"));
    await vm.deleteFile("/home/agentos/big.bin");
  });

  it("mkdir, readdir, stat, exists, move, deleteFile, remove", async () => {
    await vm.mkdir("/home/agentos/d/e/f", { recursive: true });
    await vm.writeFile("/home/agentos/d/b.txt", "b");
    await vm.writeFile("/home/agentos/d/a.txt", "a");
    assert.deepEqual(await vm.readdir("/home/agentos/d"), ["a.txt", "b.txt", "e"]);
    const stat = await vm.stat("/home/agentos/d/a.txt");
    assert.equal(stat.isFile, true);
    assert.equal(stat.isDirectory, false);
    assert.equal(stat.size, 1);
    assert.equal(typeof stat.mtimeMs, "number");
    assert.equal((await vm.stat("/home/agentos/d/e")).isDirectory, true);
    assert.equal(await vm.exists("/home/agentos/d/a.txt"), true);
    assert.equal(await vm.exists("/home/agentos/d/zzz"), false);
    await vm.move("/home/agentos/d/a.txt", "/home/agentos/d/e/moved.txt");
    assert.equal(await vm.exists("/home/agentos/d/a.txt"), false);
    assert.equal(text(await vm.readFile("/home/agentos/d/e/moved.txt")), "a");
    await vm.deleteFile("/home/agentos/d/b.txt");
    assert.equal(await vm.exists("/home/agentos/d/b.txt"), false);
    assert.equal((await rejection(vm.remove("/home/agentos/d"))).code, "EISDIR");
    await vm.remove("/home/agentos/d", { recursive: true });
    assert.equal(await vm.exists("/home/agentos/d"), false);
  });

  it("relative paths are relative to /home/agentos", async () => {
    await vm.writeFile("rel.txt", "r");
    assert.equal(text(await vm.readFile("/home/agentos/rel.txt")), "r");
  });
});

describe("processes", () => {
  let vm: VmHandle;
  before(() => {
    vm = client.vm.getOrCreate("procs");
  });

  it("exec returns exit code, stdout and stderr; cwd and env apply", async () => {
    const result = await vm.exec("node", ["-e", "console.log(1 + 1); console.error('to stderr'); process.exit(3)"]);
    assert.equal(result.exitCode, 3);
    assert.equal(result.stdout, "2\n");
    assert.equal(result.stderr, "to stderr\n");
    assert.equal(typeof result.pid, "number");
    await vm.mkdir("/home/agentos/work", { recursive: true });
    const env = await vm.exec("node", ["-e", "console.log(process.cwd() + ' ' + process.env.GREETING)"], { cwd: "/home/agentos/work", env: { GREETING: "hi" } });
    assert.equal(env.stdout, "/home/agentos/work hi\n");
  });

  it("spawn, listProcesses, killProcess, waitProcess", async () => {
    await vm.writeFile("/home/agentos/forever.js", "setInterval(() => {}, 1000);");
    const { pid } = await vm.spawn("node", ["/home/agentos/forever.js"]);
    const running = (await vm.listProcesses()).find((process) => process.pid === pid);
    assert.equal(running?.running, true);
    assert.equal(running?.command, "node");
    assert.deepEqual(running?.args, ["/home/agentos/forever.js"]);
    const waited = vm.waitProcess(pid);
    await vm.killProcess(pid, "SIGTERM");
    const exitCode = await waited;
    assert.equal(exitCode, 128 + 15);
    const after = (await vm.listProcesses()).find((process) => process.pid === pid);
    assert.equal(after?.running, false);
    assert.equal(after?.exitCode, exitCode);
    assert.equal(after?.signal, "SIGTERM");
  });

  it("waitProcess answers when the process exits on its own", async () => {
    const { pid } = await vm.spawn("node", ["-e", "setTimeout(() => process.exit(5), 100)"]);
    assert.equal(await vm.waitProcess(pid), 5);
  });

  it("connect() delivers processOutput (data as Uint8Array) and processExit; stdin writes reach the guest", async () => {
    const connection = vm.connect();
    try {
      await connection.ready;
      const output: { pid: number; stream: string; data: Uint8Array }[] = [];
      const exits: { pid: number; exitCode: number }[] = [];
      connection.on("processOutput", (event) => output.push(event));
      connection.on("processExit", (event) => exits.push(event));
      const script = `
        process.stdout.write(Buffer.from([0, 255, 128, 10]));
        process.stderr.write("err-line\\n");
        let got = "";
        process.stdin.on("data", (d) => (got += d));
        process.stdin.on("end", () => { process.stdout.write("stdin:" + got); process.exit(7); });
      `;
      const { pid } = await vm.spawn("node", ["-e", script]);
      await vm.writeProcessStdin(pid, "from ");
      await vm.writeProcessStdin(pid, new TextEncoder().encode("client"));
      await vm.closeProcessStdin(pid);
      await waitFor(() => exits.some((event) => event.pid === pid), `processExit for ${pid}`);
      assert.deepEqual(exits.find((event) => event.pid === pid), { pid, exitCode: 7, signal: null });
      const mine = output.filter((event) => event.pid === pid);
      assert.ok(mine.every((event) => event.data instanceof Uint8Array));
      const stdout = Buffer.concat(mine.filter((event) => event.stream === "stdout").map((event) => event.data));
      const stderr = Buffer.concat(mine.filter((event) => event.stream === "stderr").map((event) => event.data));
      assert.deepEqual([...stdout.subarray(0, 4)], [0, 255, 128, 10]);
      assert.equal(stdout.subarray(4).toString(), "stdin:from client");
      assert.equal(stderr.toString(), "err-line\n");
    } finally {
      await connection.dispose();
    }
  });

  it("connect(): ready and closed reject for a refused connection; dispose() resolves closed", async () => {
    const refused = client.vm.getOrCreate("k".repeat(300)).connect();
    assert.equal((await rejection(refused.ready)).code, "INVALID_ARGUMENT");
    assert.equal((await rejection(refused.closed)).code, "INVALID_ARGUMENT");
    const connection = vm.connect();
    await connection.ready;
    await connection.dispose();
    await connection.closed;
  });

  it("an event subscriber that stops reading is cut off with EVENTS_TOO_SLOW; the server holds a bounded amount for it", async () => {
    const key = "slow-reader";
    await client.vm.getOrCreate(key).writeFile("/home/agentos/x", "x"); // the VM exists
    const url = new URL(server.url);
    const socket = connect(Number(url.port), url.hostname);
    await new Promise((resolve) => socket.once("connect", resolve));
    socket.write(`GET /api/vm/${key}/events HTTP/1.1\r\nHost: ${url.host}\r\nAccept: text/event-stream\r\n\r\n`);
    socket.pause(); // a subscriber that never reads
    await new Promise((resolve) => setTimeout(resolve, 200));
    const rssBefore = process.memoryUsage().rss;
    const vm = client.vm.getOrCreate(key);
    const { pid } = await vm.spawn("sh", ["-c", "head -c 60000000 /dev/zero | tr '\\0' x"]);
    assert.equal(await vm.waitProcess(pid), 0);
    assert.ok(process.memoryUsage().rss - rssBefore < 200 * 1024 * 1024, "the server's memory grew with the unread stream");
    // Reading now: what was kept is bounded, and the last event says why the stream ended.
    let received = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => (received += chunk));
    socket.resume();
    await new Promise((resolve) => socket.once("close", resolve));
    assert.ok(received.length < 40 * 1024 * 1024, `the server kept ${received.length} characters for one subscriber`);
    assert.match(received, /event: error\ndata: \{"code":"EVENTS_TOO_SLOW"/);
  });

  it("connect({ since: 0 }) replays output printed before the subscriber came, in order, then goes on live", async () => {
    const vm = client.vm.getOrCreate("late-subscriber");
    const done = await vm.exec("sh", ["-c", "echo before-anyone-listened"]);
    const connection = vm.connect({ since: 0 });
    const seen: { pid: number; seq: number; text: string }[] = [];
    connection.on("processOutput", (event) => seen.push({ pid: event.pid, seq: event.seq, text: text(event.data) }));
    await connection.ready;
    await vm.exec("sh", ["-c", "echo live"]);
    await waitFor(() => seen.some((event) => event.text === "live\n"), "the live output");
    assert.equal(seen[0]?.pid, done.pid);
    assert.equal(seen[0]?.text, "before-anyone-listened\n");
    assert.ok(seen.every((event, i) => i === 0 || event.seq > seen[i - 1]!.seq), JSON.stringify(seen));
    const logs = await vm.getProcessLogs(done.pid);
    assert.equal(text(logs.output[0]!.data), "before-anyone-listened\n");
    await connection.dispose();
    assert.throws(() => vm.connect({ since: -1 }), { code: "INVALID_ARGUMENT" });
  });

  it("off() stops delivery to a listener", async () => {
    const connection = vm.connect();
    try {
      await connection.ready;
      const seen: number[] = [];
      const all: number[] = [];
      const listener = (event: { pid: number }) => seen.push(event.pid);
      connection.on("processExit", listener);
      connection.on("processExit", (event) => all.push(event.pid));
      connection.off("processExit", listener);
      const { pid } = await vm.spawn("node", ["-e", "0"]);
      await waitFor(() => all.includes(pid), `processExit for ${pid}`);
      assert.deepEqual(seen, []);
    } finally {
      await connection.dispose();
    }
  });
});

describe("errors keep code and message across the wire", () => {
  let vm: VmHandle;
  before(() => {
    vm = client.vm.getOrCreate("errors");
  });

  it("readFile of a missing file → ENOENT, same message as the server sent", async () => {
    const error = await rejection(vm.readFile("/home/agentos/missing.txt"));
    assert.ok(error instanceof AgentVmError);
    assert.equal(error.code, "ENOENT");
    assert.match(error.message, /missing\.txt/);
    const raw = await rawAction("errors", "readFile", JSON.stringify(["/home/agentos/missing.txt"]));
    assert.equal(raw.status, 404);
    assert.equal(raw.headers.get("x-agentvm-error"), "1");
    assert.deepEqual(await raw.json(), { error: { code: "ENOENT", message: error.message } });
  });

  it("exec past its timeout or output cap: the program is killed and the error carries what it printed", async () => {
    const slow = await rejection(vm.exec("sh", ["-c", "echo started; sleep 30"], { timeoutMs: 500 }));
    assert.equal(slow.code, "EXEC_TIMEOUT");
    assert.match(slow.message, /timeoutMs/);
    const details = (slow as AgentVmError).details as { pid: number; exitCode: number; stdout: string };
    assert.equal(details.stdout, "started\n");
    assert.equal(details.exitCode, 128 + 9);
    assert.equal((await vm.listProcesses()).find((info) => info.pid === details.pid)?.running, false);
    const chatty = await rejection(vm.exec("sh", ["-c", "yes | head -c 5000000; echo never-here"], { maxOutputBytes: 100_000 }));
    assert.equal(chatty.code, "EXEC_OUTPUT_LIMIT");
    const captured = (chatty as AgentVmError).details as { stdout: string; stderr: string };
    assert.equal(captured.stdout.length + captured.stderr.length, 100_000);
    assert.match(captured.stdout, /^(y\n)+/);
    const raw = await rawAction("errors", "exec", JSON.stringify(["sleep", ["5"], { timeoutMs: 100 }]));
    assert.equal(raw.status, 504);
    assert.equal(((await raw.json()) as { error: { details: { exitCode: number } } }).error.details.exitCode, 137);
    const bad = await rejection(vm.exec("true", [], { timeoutMs: -1 }));
    assert.equal(bad.code, "INVALID_ARGUMENT");
    assert.match(bad.message, /timeoutMs/);
  });

  it("spawn('python') → ENOENT", async () => {
    const error = await rejection(vm.spawn("python", ["-c", "print(1)"]));
    assert.equal(error.code, "ENOENT");
    assert.match(error.message, /python/);
  });

  it("wrong argument types → INVALID_ARGUMENT naming the argument", async () => {
    const untyped = vm as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
    const cases: [string, unknown[], RegExp][] = [
      ["writeFile", [123, "x"], /path/],
      ["writeFile", ["/home/agentos/x", 42], /content/],
      ["spawn", ["node", "notAnArray"], /args/],
      ["spawn", ["node", [], { cwd: 5 }], /cwd/],
      ["killProcess", ["1"], /pid/],
      ["mkdir", ["/home/agentos/m", { recursive: "yes" }], /recursive/],
    ];
    for (const [action, args, names] of cases) {
      const error = await rejection(untyped[action]!(...args));
      assert.equal(error.code, "INVALID_ARGUMENT", `${action}(${JSON.stringify(args)}): ${error.code} ${error.message}`);
      assert.match(error.message, names, `${action}(${JSON.stringify(args)}): ${error.message}`);
    }
  });

  it("killProcess / waitProcess of an unknown pid → ESRCH", async () => {
    assert.equal((await rejection(vm.killProcess(99_999))).code, "ESRCH");
    assert.equal((await rejection(vm.waitProcess(99_999))).code, "ESRCH");
  });

  it("vmFetch with nothing listening → ECONNREFUSED naming the port", async () => {
    const error = await rejection(vm.vmFetch(3999, "/"));
    assert.equal(error.code, "ECONNREFUSED");
    assert.match(error.message, /3999/);
  });

  it("an unknown action: raw fetch → 404 UNKNOWN_ACTION JSON; the client rejects the same", async () => {
    const raw = await rawAction("errors", "formatDisk", "[]");
    assert.equal(raw.status, 404);
    assert.match(raw.headers.get("content-type") ?? "", /application\/json/);
    const body = (await raw.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, "UNKNOWN_ACTION");
    assert.match(body.error.message, /formatDisk/);
    const error = await rejection((vm as unknown as { formatDisk(): Promise<unknown> }).formatDisk());
    assert.equal(error.code, "UNKNOWN_ACTION");
    const unknownDefinition = await fetch(`${server.url}/api/nope/k/actions/readdir`, { method: "POST", body: "[]" });
    assert.equal(unknownDefinition.status, 404);
    assert.equal(((await unknownDefinition.json()) as { error: { code: string } }).error.code, "UNKNOWN_ACTION");
    const unknownRoute = await fetch(`${server.url}/nothing/here`);
    assert.equal(unknownRoute.status, 404);
    assert.equal(((await unknownRoute.json()) as { error: { code: string } }).error.code, "UNKNOWN_ACTION");
    const wrongMethod = await fetch(`${server.url}/api/vm/errors/actions/readdir`);
    assert.equal(wrongMethod.status, 404);
  });

  it("a malformed body → 400 MALFORMED_REQUEST", async () => {
    const bodies: [string | Uint8Array, Record<string, string>][] = [
      ["{not json", { "content-type": "application/json" }],
      ['{"value": 5}', { "content-type": "application/json" }],
      ['"just a string"', { "content-type": "application/json" }],
      [new Uint8Array([0, 0]), { "content-type": "application/vnd.agentvm.envelope" }],
      [new Uint8Array([0, 0, 0, 99, 123]), { "content-type": "application/vnd.agentvm.envelope" }],
      ['["/x", {"$base64": "!!!not base64!!!"}]', { "content-type": "application/json" }],
    ];
    for (const [body, headers] of bodies) {
      const raw = await rawAction("errors", "writeFile", body, headers);
      const json = (await raw.json()) as { error: { code: string; message: string } };
      assert.equal(raw.status, 400, `${String(body)} → ${raw.status} ${JSON.stringify(json)}`);
      assert.equal(json.error.code, "MALFORMED_REQUEST", String(body));
    }
  });

  it("keys: empty → INVALID_ARGUMENT in the client; 300 characters → INVALID_ARGUMENT from the server; 256 is fine", async () => {
    assert.throws(() => client.vm.getOrCreate(""), (error: AgentVmError) => error.code === "INVALID_ARGUMENT");
    assert.throws(() => client.vm.getOrCreate([]), (error: AgentVmError) => error.code === "INVALID_ARGUMENT");
    assert.throws(() => client.vm.getOrCreate([""]), (error: AgentVmError) => error.code === "INVALID_ARGUMENT");
    const long = await rejection(client.vm.getOrCreate("k".repeat(300)).exists("/"));
    assert.equal(long.code, "INVALID_ARGUMENT");
    assert.match(long.message, /256/);
    const raw = await rawAction("k".repeat(300), "exists", '["/"]');
    assert.equal(raw.status, 400);
    assert.equal(((await raw.json()) as { error: { code: string } }).error.code, "INVALID_ARGUMENT");
    assert.equal(await client.vm.getOrCreate("k".repeat(256)).exists("/home/agentos"), true);
  });

  it("keys that URLs treat as dot segments ('.', '..') → INVALID_ARGUMENT from the client (not a request to another route)", async () => {
    for (const key of [".", "..", ["."], [".."]]) {
      assert.throws(
        () => client.vm.getOrCreate(key),
        (error: AgentVmError) => error.code === "INVALID_ARGUMENT" && /dot|URL/.test(error.message),
        JSON.stringify(key),
      );
    }
    // Dots inside a key are fine.
    assert.equal(await client.vm.getOrCreate("...").exists("/home/agentos"), true);
  });
});

describe("keys", () => {
  it('["key"] and "key" address the same VM; ["a", "b"] is another one', async () => {
    await client.vm.getOrCreate(["same-key"]).writeFile("/home/agentos/k.txt", "from the array form");
    assert.equal(text(await client.vm.getOrCreate("same-key").readFile("/home/agentos/k.txt")), "from the array form");
    const pair = client.vm.getOrCreate(["same-key", "b"]);
    assert.equal(await pair.exists("/home/agentos/k.txt"), false);
    await pair.writeFile("/home/agentos/k.txt", "pair");
    assert.equal(text(await client.vm.getOrCreate(["same-key", "b"]).readFile("/home/agentos/k.txt")), "pair");
    assert.equal(text(await client.vm.getOrCreate("same-key").readFile("/home/agentos/k.txt")), "from the array form");
  });

  it("keys with slashes, spaces and unicode work", async () => {
    const handle = client.vm.getOrCreate("team/alice bob?ü#1");
    await handle.writeFile("/home/agentos/x", "y");
    assert.equal(text(await client.vm.getOrCreate(["team/alice bob?ü#1"]).readFile("/home/agentos/x")), "y");
  });
});

describe("vmFetch", () => {
  let vm: VmHandle;
  let pid: number;
  before(async () => {
    vm = client.vm.getOrCreate("fetch");
    await vm.writeFile("/home/agentos/server.js", GUEST_SERVER);
    pid = (await vm.spawn("node", ["/home/agentos/server.js"])).pid;
    await listening(vm, 3000);
  });

  it("method, headers, binary body, path and query reach the guest; status, reason and headers come back", async () => {
    const body = Uint8Array.from({ length: 256 }, (_, i) => i);
    const response = await vm.vmFetch(3000, "/api/data?x=1&y=%20", { method: "PUT", headers: { "X-Custom": "yes", "content-type": "application/octet-stream" }, body });
    assert.equal(response.status, 201);
    assert.equal(response.statusText, "Made It");
    assert.equal(response.headers["x-method"], "PUT");
    assert.equal(response.headers["x-url"], "/api/data?x=1&y=%20");
    const seen = JSON.parse(response.headers["x-headers"]!) as Record<string, string>;
    assert.equal(seen["x-custom"], "yes");
    assert.equal(seen["content-type"], "application/octet-stream");
    assert.equal(seen["x-agentvm-forward-headers"], undefined);
    assert.equal(seen["user-agent"], undefined, "headers fetch adds on its own are not forwarded");
    assert.ok(response.body instanceof Uint8Array);
    assert.deepEqual([...response.body], [...body]);
  });

  it("a path without a leading slash and a full URL both work", async () => {
    assert.equal((await vm.vmFetch(3000, "plain")).headers["x-url"], "/plain");
    assert.equal((await vm.vmFetch(3000, "http://localhost:3000/full?q=1")).headers["x-url"], "/full?q=1");
  });

  it("vmFetchStream delivers the first chunk before the guest ends the response", async () => {
    const response = await vm.vmFetchStream(3000, "/stream");
    assert.equal(response.status, 200);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let received = "";
    while (!received.includes("first-chunk\n")) {
      const { value, done } = await reader.read();
      assert.equal(done, false, "the stream ended before the guest released it");
      received += decoder.decode(value, { stream: true });
    }
    assert.equal(text((await vm.vmFetch(3000, "/release")).body), "released");
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      received += decoder.decode(value, { stream: true });
    }
    assert.equal(received, "first-chunk\nlast-chunk\n");
  });

  it("vmFetchStream carries a 16 MiB body", async () => {
    const total = 16 * 1024 * 1024;
    const response = await vm.vmFetchStream(3000, `/big/${total}`);
    let size = 0;
    let sevens = true;
    for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
      size += chunk.byteLength;
      if (sevens && chunk.some((byte) => byte !== 7)) sevens = false;
    }
    assert.equal(size, total);
    assert.ok(sevens);
  });

  it("a streamed request body (ReadableStream) reaches the guest", async () => {
    const parts = ["one,", "two,", "three"];
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const part of parts) controller.enqueue(new TextEncoder().encode(part));
        controller.close();
      },
    });
    const response = await vm.vmFetch(3000, "/upload", { method: "POST", body });
    assert.equal(text(response.body), "one,two,three");
  });

  it("timeoutMs reaches the server: a guest that never answers → ETIMEDOUT; the option is not forwarded as a header", async () => {
    const error = await rejection(vm.vmFetch(3000, "/never", { timeoutMs: 200 }));
    assert.equal(error.code, "ETIMEDOUT", error.message);
    assert.equal((await rejection(vm.vmFetch(3000, "/", { timeoutMs: -1 }))).code, "INVALID_ARGUMENT");
    const response = await vm.vmFetch(3000, "/echo", { timeoutMs: 5_000 });
    assert.equal(response.status, 201);
    const seen = JSON.parse(response.headers["x-headers"]!) as Record<string, string>;
    assert.deepEqual(Object.keys(seen).filter((name) => name.startsWith("x-agentvm")), []);
  });

  it("a body the guest cuts off fails with an AgentVmError, every time (vmFetch and vmFetchStream)", async () => {
    // Timing decides whether the cut lands before or after the server starts relaying: repeat.
    for (let round = 0; round < 6; round++) {
      const buffered = await settles(vm.vmFetch(3000, "/cut"), `vmFetch /cut, round ${round}`);
      assert.equal(buffered.status, "rejected", `round ${round}: a cut-off body resolved`);
      const error = (buffered as PromiseRejectedResult).reason as AgentVmError;
      assert.ok(error instanceof AgentVmError, String(error));
      assert.ok(["FETCH_FAILED", "ECONNRESET"].includes(error.code), `${error.code}: ${error.message}`);
      const streamed = await settles(
        (async () => {
          const response = await vm.vmFetchStream(3000, "/cut");
          for await (const _ of response.body as unknown as AsyncIterable<Uint8Array>);
        })(),
        `vmFetchStream /cut, round ${round}`,
      );
      assert.equal(streamed.status, "rejected", `round ${round}: a cut-off stream ended cleanly`);
      assert.ok((streamed as PromiseRejectedResult).reason instanceof AgentVmError, String((streamed as PromiseRejectedResult).reason));
    }
  });

  it("a guest killed mid-response makes the client's stream fail (it does not hang or end cleanly)", async () => {
    const response = await vm.vmFetchStream(3000, "/stream");
    const reader = response.body.getReader();
    const first = await reader.read();
    assert.match(text(first.value!), /first-chunk/);
    await vm.killProcess(pid, "SIGKILL");
    const outcome = await settles(
      (async () => {
        for (;;) if ((await reader.read()).done) return "ended cleanly";
      })(),
      "reading a stream whose guest died",
    );
    assert.equal(outcome.status, "rejected", "a truncated body must not look complete");
    assert.ok((outcome as PromiseRejectedResult).reason instanceof AgentVmError);
  });
});

describe("wire", () => {
  it("curl-style JSON with {\"$base64\": …} works via raw fetch; form and text bodies (what curl -d and cross-site forms send) → 415", async () => {
    const write = await rawAction("curl", "writeFile", '["/home/agentos/hi.txt", {"$base64": "aGVsbG8="}]');
    assert.equal(write.status, 200);
    assert.deepEqual(await write.json(), { value: null });
    const read = await rawAction("curl", "readFile", '{"value": ["/home/agentos/hi.txt"]}');
    assert.equal(read.status, 200);
    assert.match(read.headers.get("content-type") ?? "", /application\/json/);
    assert.deepEqual(await read.json(), { value: { $base64: "aGVsbG8=" } });
    for (const headers of [{ "content-type": "application/x-www-form-urlencoded" }, {}] as Record<string, string>[]) {
      const refused = await rawAction("curl", "readdir", '["/home/agentos"]', headers);
      assert.equal(refused.status, 415);
      const body = (await refused.json()) as { error: { code: string; message: string } };
      assert.equal(body.error.code, "UNSUPPORTED_MEDIA_TYPE");
      assert.match(body.error.message, /content-type: application\/json/);
    }
    const exec = await rawAction("curl", "exec", '["node", ["-e", "console.log(40 + 2)"]]');
    const result = (await exec.json()) as { value: { exitCode: number; stdout: string } };
    assert.equal(result.value.exitCode, 0);
    assert.equal(result.value.stdout, "42\n");
    assert.equal(text(await client.vm.getOrCreate("curl").readFile("/home/agentos/hi.txt")), "hello");
  });

  it("raw vmFetch route: GET through /api/vm/{key}/fetch/{port}/… returns the guest's response", async () => {
    const vm = client.vm.getOrCreate("fetch-raw");
    await vm.writeFile("/home/agentos/s.js", `require("http").createServer((q, s) => s.end("raw " + q.method + " " + q.url)).listen(3100);`);
    await vm.spawn("node", ["/home/agentos/s.js"]);
    await listening(vm, 3100);
    const response = await fetch(`${server.url}/api/vm/fetch-raw/fetch/3100/a/b?c=d`, { method: "DELETE" });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("x-agentvm-error"), null);
    assert.equal(await response.text(), "raw DELETE /a/b?c=d");
  });

  it("16 concurrent clients writing and reading distinct files on one VM are all correct", async () => {
    const results = await Promise.all(
      Array.from({ length: 16 }, async (_, i) => {
        const own = createClient<typeof registry>({ endpoint: server.url }).vm.getOrCreate("concurrent");
        const content = Buffer.concat([Buffer.from(`client ${i}\n`), randomBytes(64 * 1024 + i)]);
        await own.writeFile(`/home/agentos/c${i}.bin`, content);
        const back = await own.readFile(`/home/agentos/c${i}.bin`);
        const exec = await own.exec("node", ["-e", `process.stdout.write(require("fs").readFileSync("/home/agentos/c${i}.bin").subarray(0, 12).toString())`]);
        return { i, ok: Buffer.from(back).equals(content), head: exec.stdout };
      }),
    );
    for (const { i, ok, head } of results) {
      assert.ok(ok, `client ${i} read back different bytes`);
      assert.equal(head.split("\n")[0], `client ${i}`);
    }
    assert.equal((await client.vm.getOrCreate("concurrent").readdir("/home/agentos")).length, 16);
  });

  it("no call hangs: every action with hostile arguments settles with an AgentVmError", async () => {
    const vm = client.vm.getOrCreate("hostile") as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
    const hostile: unknown[][] = [[], [null], [{}], [[]], [-1, -1, -1], ["/home/agentos", { recursive: { deep: true } }], [{ $base64: 5 }], [Number.MAX_SAFE_INTEGER, "SIGFAKE"], ["\u0000"]];
    for (const action of VM_ACTIONS) {
      for (const args of hostile) {
        const outcome = await settles(vm[action]!(...args), `${action}(${JSON.stringify(args)})`);
        if (outcome.status === "rejected") {
          const error = outcome.reason as AgentVmError;
          assert.ok(error instanceof AgentVmError, `${action}(${JSON.stringify(args)}) rejected with a non-AgentVmError: ${String(error)}`);
          assert.notEqual(error.code, "INTERNAL", `${action}(${JSON.stringify(args)}): ${error.message}`);
          assert.notEqual(error.code, "SERVER_UNREACHABLE", `${action}(${JSON.stringify(args)}): ${error.message}`);
        }
      }
    }
    // The server still answers afterwards.
    assert.equal(await client.vm.getOrCreate("hostile").exists("/home/agentos"), true);
  });

  it("an unreachable server → SERVER_UNREACHABLE, not a hang", async () => {
    const dead = createClient<typeof registry>("http://127.0.0.1:1").vm.getOrCreate("x");
    const outcome = await settles(dead.exists("/"), "a call to a closed port");
    assert.equal(outcome.status, "rejected");
    assert.equal((outcome as PromiseRejectedResult).reason.code, "SERVER_UNREACHABLE");
  });
});
