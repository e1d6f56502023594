/**
 * Streamed files through the HTTP API, against a real server in its own
 * process (bench/server-process.ts, so its memory is read from /proc, apart
 * from this test's):
 * 1 GiB each way with the server's RSS flat, uploads that break off, downloads
 * the client walks away from, ranges, modes and append, authorization and
 * cross-site refusal, paths that try to leave the VM.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { AgentVmError, createClient, type VmHandle } from "agentvm/client";
import { startServerProcess, type BenchRegistry as ChildRegistry, type ServerProcess } from "../bench/server-process.ts";
import { openFilesUnder, rejection, tempDataDir, text, waitFor } from "./helpers.ts";

const GIB = 1024 * 1024 * 1024;
const CHUNK = 1024 * 1024;
/** How much the server's RSS may grow while 1 GiB streams through it. */
const RSS_GROWTH_LIMIT = 150 * 1024 * 1024;

const rssBytes = (server: ServerProcess): number => server.rssKb() * 1024;

/** Samples the server's RSS every 50 ms while `work` runs; resolves with the highest seen. */
async function peakRss<T>(server: ServerProcess, work: () => Promise<T>): Promise<{ result: T; peak: number }> {
  let peak = rssBytes(server);
  const timer = setInterval(() => (peak = Math.max(peak, rssBytes(server))), 50);
  try {
    const result = await work();
    return { result, peak: Math.max(peak, rssBytes(server)) };
  } finally {
    clearInterval(timer);
  }
}

/** `size` bytes made as they are read (chunk i is filled with i & 255), hashed as they go. */
function generated(size: number, hash = createHash("sha256")): { stream: ReadableStream<Uint8Array>; digest: () => string } {
  let sent = 0;
  let index = 0;
  const stream = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent >= size) {
        controller.close();
        return;
      }
      const chunk = Buffer.alloc(Math.min(CHUNK, size - sent), index++ & 255);
      hash.update(chunk);
      sent += chunk.byteLength;
      controller.enqueue(chunk);
    },
  });
  return { stream, digest: () => hash.digest("hex") };
}

async function digestOf(stream: ReadableStream<Uint8Array>): Promise<{ digest: string; bytes: number }> {
  const hash = createHash("sha256");
  let bytes = 0;
  for await (const chunk of stream) {
    hash.update(chunk);
    bytes += chunk.byteLength;
  }
  return { digest: hash.digest("hex"), bytes };
}


/** Leftover temporary files of interrupted writes in a VM directory. */
function tempFiles(hostDir: string): string[] {
  return readdirSync(hostDir).filter((name) => name.startsWith(".agentvm-"));
}

describe("streamed files over HTTP (server in its own process)", () => {
  let dataDir: string;
  let server: ServerProcess;
  let vm: VmHandle;
  let home: string;

  before(async () => {
    dataDir = await tempDataDir("agentvm-files-");
    server = await startServerProcess(dataDir);
    vm = createClient<ChildRegistry>(server.url).vm.getOrCreate("big");
    // Warm up: the VM exists, its directory too, code paths are compiled.
    await vm.upload("/home/agentos/warm.bin", generated(8 * CHUNK).stream);
    await new Response(await vm.download("/home/agentos/warm.bin")).arrayBuffer();
    home = join(dataDir, "vms", "big", "root", "home", "agentos");
  });
  after(() => server.stop());

  it("uploads and downloads 1 GiB with the server's memory flat", async () => {
    const baseline = rssBytes(server);
    const source = generated(GIB);
    let progressed = 0;
    const upload = await peakRss(server, () => vm.upload("/home/agentos/big.bin", source.stream, { onProgress: (p) => (progressed = p.bytes) }));
    assert.deepEqual(upload.result, { path: "/home/agentos/big.bin", size: GIB });
    assert.equal(progressed, GIB);
    assert.ok(upload.peak - baseline < RSS_GROWTH_LIMIT, `server RSS grew ${((upload.peak - baseline) / 2 ** 20).toFixed(0)} MiB during a 1 GiB upload`);
    assert.equal((await vm.stat("/home/agentos/big.bin")).size, GIB);

    let total: number | undefined;
    const download = await peakRss(server, async () => digestOf(await vm.download("/home/agentos/big.bin", { onProgress: (p) => (total = p.total) })));
    assert.equal(download.result.bytes, GIB);
    assert.equal(download.result.digest, source.digest(), "the downloaded bytes are the uploaded ones");
    assert.equal(total, GIB);
    assert.ok(download.peak - baseline < RSS_GROWTH_LIMIT, `server RSS grew ${((download.peak - baseline) / 2 ** 20).toFixed(0)} MiB during a 1 GiB download`);
    await vm.deleteFile("/home/agentos/big.bin");
  });

  it("an upload that breaks off leaves nothing under its name, and no temporary file", async () => {
    await vm.writeFile("/home/agentos/kept.txt", "old content");
    const url = new URL(`${server.url}/api/vm/big/files/home/agentos/kept.txt`);
    const fresh = new URL(`${server.url}/api/vm/big/files/home/agentos/never.bin`);
    for (const target of [url, fresh]) {
      await new Promise<void>((resolve) => {
        const req = httpRequest(target, { method: "PUT", headers: { "content-type": "application/octet-stream", "content-length": String(64 * CHUNK) } });
        req.on("error", () => resolve());
        req.write(Buffer.alloc(4 * CHUNK, 1), () => {
          // Wait until the server has written some of it, then cut the connection.
          setTimeout(() => {
            req.destroy();
            resolve();
          }, 300);
        });
      });
    }
    await waitFor(() => tempFiles(home).length === 0, "the interrupted uploads' temporary files to be removed");
    assert.equal(text(await vm.readFile("/home/agentos/kept.txt")), "old content");
    assert.equal(await vm.exists("/home/agentos/never.bin"), false);
    assert.deepEqual(openFilesUnder(server.pid, home), []);
  });

  it("a client that walks away mid-download leaves no open file; the server keeps serving", async () => {
    await vm.upload("/home/agentos/walk.bin", generated(256 * CHUNK).stream);
    const controller = new AbortController();
    const stream = await vm.download("/home/agentos/walk.bin", { signal: controller.signal });
    const reader = stream.getReader();
    await reader.read();
    controller.abort();
    await reader.read().catch(() => undefined);
    await waitFor(() => openFilesUnder(server.pid, home).length === 0, "the server to close the file of the abandoned download");
    assert.equal((await digestOf(await vm.download("/home/agentos/walk.bin"))).bytes, 256 * CHUNK);
  });

  it("append, mode, ranges and HEAD", async () => {
    await vm.upload("/home/agentos/tool.sh", "#!/bin/sh\necho hi\n", { mode: 0o755 });
    assert.equal((await vm.stat("/home/agentos/tool.sh")).mode & 0o7777, 0o755);
    assert.equal((await vm.exec("/home/agentos/tool.sh", [])).stdout, "hi\n");
    await vm.upload("/home/agentos/log.txt", "one\n");
    await vm.upload("log.txt", new Blob(["two\n"]), { append: true });
    await vm.writeFile("/home/agentos/log.txt", "three\n", { append: true });
    assert.equal(text(await vm.readFile("/home/agentos/log.txt")), "one\ntwo\nthree\n");
    await vm.writeFile("/home/agentos/private", "x", { mode: 0o600 });
    assert.equal((await vm.stat("/home/agentos/private")).mode & 0o777, 0o600);
    assert.equal(await new Response(await vm.download("/home/agentos/log.txt", { start: 4, end: 6 })).text(), "two");

    const suffix = await fetch(`${server.url}/api/vm/big/files/home/agentos/log.txt`, { headers: { range: "bytes=-6" } });
    assert.equal(suffix.status, 206);
    assert.equal(suffix.headers.get("content-range"), "bytes 8-13/14");
    assert.equal(await suffix.text(), "three\n");
    const head = await fetch(`${server.url}/api/vm/big/files/home/agentos/tool.sh`, { method: "HEAD" });
    assert.equal(head.headers.get("content-length"), "18");
    assert.equal(head.headers.get("x-agentvm-file-mode"), "755");
    const past = await fetch(`${server.url}/api/vm/big/files/home/agentos/log.txt`, { headers: { range: "bytes=100-" } });
    assert.equal(past.status, 416);
    assert.equal(((await past.json()) as { error: { code: string } }).error.code, "RANGE_NOT_SATISFIABLE");

    assert.equal((await rejection(vm.upload("/home/agentos/x", "x", { mode: 0o4755 }))).code, "INVALID_ARGUMENT");
    assert.equal((await rejection(vm.writeFile("/home/agentos/x", "x", { mode: 0o2755 }))).code, "INVALID_ARGUMENT");
    assert.equal((await rejection(vm.download("/home/agentos/missing"))).code, "ENOENT");
    assert.equal((await rejection(vm.download("/home/agentos"))).code, "EISDIR");
    assert.equal((await rejection(vm.upload("/usr/bin/evil", "x"))).code, "EROFS");
  });

  it("paths stay in the VM: `..` stops at its root, symlinks to host paths resolve inside it", async () => {
    const hostSecret = join(dataDir, "host-secret.txt");
    await writeFile(hostSecret, "host only");
    // A guest symlink to the host path of a file outside its root.
    await vm.exec("ln", ["-s", hostSecret, "/home/agentos/escape"]);
    assert.equal((await rejection(vm.download("/home/agentos/escape"))).code, "ENOENT");
    await vm.upload("/home/agentos/escape", "written through the link");
    assert.equal(readFileSync(hostSecret, "utf8"), "host only");
    // Raw `..` segments in the URL (the client resolves them itself, curl need not).
    const raw = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = httpRequest(`${server.url}/api/vm/big/files/../../../../../../../../etc/passwd`, { method: "GET" }, (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk: string) => (body += chunk));
        res.on("end", () => resolve({ status: res.statusCode!, body }));
      });
      req.on("error", reject);
      req.end();
    });
    assert.notEqual(raw.status, 200, `a raw ../ path was served: ${raw.body.slice(0, 100)}`);
    const climbing = await fetch(`${server.url}/api/vm/big/files/home/agentos/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/hostname`);
    // Decoded to /home/agentos/../../../../etc/hostname, which is the VM's /etc/hostname (or nothing), never the host's.
    if (climbing.status === 200) assert.notEqual(await climbing.text(), readFileSync("/etc/hostname", "utf8"));
    await mkdir(join(dataDir, "outside"), { recursive: true });
    await vm.upload("/../../../outside-upload.txt", "clamped");
    assert.equal(existsSync(join(dataDir, "outside-upload.txt")), false);
    assert.equal(text(await vm.readFile("/outside-upload.txt")), "clamped");
  });

  it("uploads refuse cross-site requests and form content types", async () => {
    const target = `${server.url}/api/vm/big/files/home/agentos/csrf.txt`;
    const foreign = await fetch(target, { method: "PUT", headers: { origin: "http://evil.example", "content-type": "text/plain" }, body: "pwned" });
    assert.equal(foreign.status, 403);
    assert.equal(((await foreign.json()) as { error: { code: string } }).error.code, "ORIGIN_NOT_ALLOWED");
    const crossSite = await fetch(target, { method: "PUT", headers: { "sec-fetch-site": "cross-site", "content-type": "application/octet-stream" }, body: "pwned" });
    assert.equal(crossSite.status, 403);
    for (const type of ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]) {
      const form = await fetch(target, { method: "PUT", headers: { "content-type": type }, body: "pwned" });
      assert.equal(form.status, 415, type);
    }
    const noType = await fetch(target, { method: "PUT", body: new Uint8Array([1]) });
    assert.equal(noType.status, 415);
    assert.equal(await vm.exists("/home/agentos/csrf.txt"), false);
    const wrongMethod = await fetch(target, { method: "POST", headers: { "content-type": "application/octet-stream" }, body: "x" });
    assert.equal(((await wrongMethod.json()) as { error: { code: string } }).error.code, "UNKNOWN_ACTION");
  });
});

describe("streamed files with API keys and tokens", () => {
  let server: ServerProcess;
  const apiKey = `avk_${"k".repeat(40)}`;

  before(async () => {
    server = await startServerProcess(await tempDataDir("agentvm-files-auth-"), {}, { auth: { apiKeys: [apiKey] } });
  });
  after(() => server.stop());

  async function token(actions: string[] | "*", key = "t"): Promise<string> {
    const response = await fetch(`${server.url}/api/tokens`, {
      method: "POST",
      headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({ key, actions }),
    });
    return ((await response.json()) as { value: { token: string } }).value.token;
  }

  it("each route needs its own action in a token", async () => {
    const anonymous = createClient<ChildRegistry>({ endpoint: server.url, token: "" }).vm.getOrCreate("t");
    assert.equal((await rejection(anonymous.upload("/home/agentos/a", "x"))).code, "UNAUTHENTICATED");
    const uploader = createClient<ChildRegistry>({ endpoint: server.url, token: await token(["uploadFile"]) }).vm.getOrCreate("t");
    assert.deepEqual(await uploader.upload("/home/agentos/a", "x"), { path: "/home/agentos/a", size: 1 });
    assert.equal((await rejection(uploader.download("/home/agentos/a"))).code, "FORBIDDEN");
    assert.equal((await rejection(uploader.downloadTar("/home/agentos"))).code, "FORBIDDEN");
    assert.equal((await rejection(uploader.uploadTar("/home/agentos", new Uint8Array(1024)))).code, "FORBIDDEN");
    assert.equal((await rejection(uploader.watch("/home/agentos"))).code, "FORBIDDEN");
    const reader = createClient<ChildRegistry>({ endpoint: server.url, token: await token(["downloadFile", "watch"]) }).vm.getOrCreate("t");
    assert.equal(await new Response(await reader.download("/home/agentos/a")).text(), "x");
    assert.equal((await rejection(reader.upload("/home/agentos/b", "x"))).code, "FORBIDDEN");
    const watch = await reader.watch("/home/agentos");
    await watch.close();
    const everything = createClient<ChildRegistry>({ endpoint: server.url, token: await token("*") }).vm.getOrCreate("t");
    assert.ok((await new Response(await everything.downloadTar("/home/agentos")).arrayBuffer()).byteLength > 0);
    const otherVm = createClient<ChildRegistry>({ endpoint: server.url, token: await token("*", "other") }).vm.getOrCreate("t");
    const error = await rejection(otherVm.download("/home/agentos/a"));
    assert.ok(error instanceof AgentVmError && error.code === "FORBIDDEN");
  });
});
