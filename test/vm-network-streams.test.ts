/**
 * Large bodies, flow control and failures between the host and real guests:
 * vmFetch streams 100 MiB both ways in flat host memory, a slow host reader holds
 * a guest writer back, and a guest that dies mid-response fails the request
 * without hurting the host or the VM.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import type { Vm } from "agentvm";
import { rejection, tempDataDir, testVm, text, waitFor } from "./helpers.ts";
import { startGuest } from "./vm-network-support.ts";

const MiB = 1024 * 1024;
const vm: Vm = await testVm(await tempDataDir("agentvm-net-streams-"), { name: "streams" });

/**
 * Garbage from 100 MiB of short-lived chunks alone can lift RSS by ~70 MiB before
 * V8 collects it; collecting as we go makes peak RSS measure what is retained.
 */
setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

/** Peak host RSS over a run, sampled after a collection every few MiB. */
function rssTracker(): { sample(bytes: number): void; readonly growth: number } {
  gc();
  const baseline = process.memoryUsage().rss;
  let peak = baseline;
  let next = 0;
  return {
    sample(bytes) {
      if (bytes < next) return;
      next = bytes + 8 * MiB;
      gc();
      peak = Math.max(peak, process.memoryUsage().rss);
    },
    get growth() {
      return peak - baseline;
    },
  };
}

/** Reads a web stream to the end, hashing it; calls `onChunk` after each chunk (may wait). */
async function drain(body: ReadableStream<Uint8Array>, onChunk?: (total: number) => Promise<void> | void): Promise<{ bytes: number; sha256: string }> {
  const hash = createHash("sha256");
  let bytes = 0;
  const reader = body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    hash.update(value);
    bytes += value.byteLength;
    await onChunk?.(bytes);
  }
  return { bytes, sha256: hash.digest("hex") };
}

describe("large bodies", () => {
  test("100 MiB uploaded and echoed back streams through with flat host memory", async () => {
    const echo = await startGuest(
      vm,
      `const http = require("http");
      http.createServer((req, res) => {
        res.setHeader("content-type", "application/octet-stream");
        req.pipe(res);
      }).listen(3000, () => console.log("echo up"));`,
      /echo up/,
    );
    const TOTAL = 100 * MiB;
    const CHUNK = 256 * 1024;
    const block = randomBytes(CHUNK);
    const sent = createHash("sha256");
    let produced = 0;
    const upload = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (produced >= TOTAL) return controller.close();
        // Each chunk differs (its first bytes carry its index), so reordering would show in the hash.
        const chunk = Buffer.from(block);
        chunk.writeUInt32LE(produced / CHUNK, 0);
        sent.update(chunk);
        produced += chunk.byteLength;
        controller.enqueue(chunk);
      },
    });

    const rss = rssTracker();
    const response = await vm.vmFetchStream(3000, "/echo", { method: "POST", body: upload, headers: { "content-type": "application/octet-stream" } });
    assert.equal(response.status, 200);
    const received = await drain(response.body, (total) => rss.sample(total));
    assert.equal(received.bytes, TOTAL);
    assert.equal(received.sha256, sent.digest("hex"));
    assert.ok(rss.growth < 60 * MiB, `host RSS grew by ${(rss.growth / MiB).toFixed(1)} MiB while streaming 100 MiB each way`);
    await vm.killProcess(echo.pid, "SIGKILL");
    await vm.waitProcess(echo.pid);
  });

  test("a slow host reader holds a guest writing 50 MiB back, and everything arrives", async () => {
    const writer = await startGuest(
      vm,
      `const http = require("http");
      const TOTAL = 50 * 1024 * 1024, CHUNK = 64 * 1024;
      http.createServer((req, res) => {
        let written = 0, waits = 0;
        const pump = () => {
          while (written < TOTAL) {
            written += CHUNK;
            if (!res.write(Buffer.alloc(CHUNK, 7))) {
              waits++;
              return res.once("drain", pump);
            }
          }
          res.end();
          console.log("WAITS " + waits);
        };
        pump();
      }).listen(3001, () => console.log("writer up"));`,
      /writer up/,
    );
    const rss = rssTracker();
    const response = await vm.vmFetchStream(3001, "/");
    let nextPause = 4 * MiB;
    const received = await drain(response.body, async (total) => {
      rss.sample(total);
      if (total >= nextPause) {
        nextPause += 4 * MiB;
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
    });
    assert.equal(received.bytes, 50 * MiB);
    assert.ok(rss.growth < 40 * MiB, `host RSS grew by ${(rss.growth / MiB).toFixed(1)} MiB`);
    // The guest's writer really waited on the reader.
    const waits = Number((await waitFor(() => writer.output.stdout.match(/WAITS (\d+)/), "the writer's report"))[1]);
    assert.ok(waits > 0, "res.write never returned false");
    await vm.killProcess(writer.pid, "SIGKILL");
    await vm.waitProcess(writer.pid);
  });
});

describe("a guest that fails", () => {
  const DYING = `const http = require("http");
    http.createServer((req, res) => {
      if (req.url === "/ok") return res.end("alive " + process.pid);
      if (req.url === "/silent") return setTimeout(() => process.exit(7), 50);
      res.writeHead(200, { "content-length": String(10 * 1024 * 1024) });
      res.write(Buffer.alloc(1024 * 1024, 1), () => setTimeout(() => process.exit(3), 20));
    }).listen(3100, () => console.log("up " + process.pid));`;

  test("dies mid-response: vmFetch rejects, the host keeps working, a restarted server answers", async () => {
    const first = await startGuest(vm, DYING, /up/);
    assert.equal(text((await vm.vmFetch(3100, "/ok")).body), `alive ${first.pid}`);
    const error = await rejection(vm.vmFetch(3100, "/die"));
    assert.ok(error.code === "ECONNRESET" || error.code === "FETCH_FAILED", `code ${error.code}: ${error.message}`);
    assert.equal(await vm.waitProcess(first.pid), 3);
    assert.ok(!(await vm.listeningPorts()).includes(3100), "the dead server's port is still bound");
    await waitFor(() => vm.networkStats().connections === 0, "the dead server's connections to close");

    const refused = await rejection(vm.vmFetch(3100, "/ok"));
    assert.equal(refused.code, "ECONNREFUSED");

    const second = await startGuest(vm, DYING, /up/);
    assert.equal(text((await vm.vmFetch(3100, "/ok")).body), `alive ${second.pid}`);
    await vm.killProcess(second.pid, "SIGKILL");
    await vm.waitProcess(second.pid);
  });

  test("dies mid-stream: the vmFetchStream body errors instead of ending short", async () => {
    const server = await startGuest(vm, DYING, /up/);
    const response = await vm.vmFetchStream(3100, "/die");
    assert.equal(response.status, 200);
    const error = await rejection(drain(response.body));
    assert.ok(error.code === "ECONNRESET" || error.code === "FETCH_FAILED" || error.code === "ERR_STREAM_PREMATURE_CLOSE", `code ${error.code}: ${error.message}`);
    await vm.waitProcess(server.pid);
  });

  test("dies before answering: vmFetch rejects", async () => {
    const server = await startGuest(vm, DYING, /up/);
    const error = await rejection(vm.vmFetch(3100, "/silent"));
    assert.ok(error.code === "ECONNRESET" || error.code === "FETCH_FAILED", `code ${error.code}: ${error.message}`);
    assert.equal(await vm.waitProcess(server.pid), 7);
  });

  test("killed by the host while a request waits: the request fails, other servers are unaffected", async () => {
    const hanging = await startGuest(vm, `require("http").createServer(() => {}).listen(3200, () => console.log("up"));`, /up/);
    const bystander = await startGuest(vm, `require("http").createServer((q, s) => s.end("bystander")).listen(3201, () => console.log("up"));`, /up/);
    const pending = vm.vmFetch(3200, "/never");
    await waitFor(() => vm.networkStats().connections >= 1, "the request's connection");
    await vm.killProcess(hanging.pid, "SIGKILL");
    const error = await rejection(pending);
    assert.ok(error.code === "ECONNRESET" || error.code === "FETCH_FAILED", `code ${error.code}: ${error.message}`);
    assert.equal(text((await vm.vmFetch(3201, "/")).body), "bystander");
    await vm.killProcess(bystander.pid, "SIGKILL");
    await Promise.all([vm.waitProcess(hanging.pid), vm.waitProcess(bystander.pid)]);
  });
});
