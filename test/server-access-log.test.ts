/**
 * Structured access logs: with logLevel "info" every request is one JSON line
 * (route template, VM, status, duration); preview tokens and credentials never
 * appear; below "info" nothing is written.
 */
import assert from "node:assert/strict";
import { after, before, it } from "node:test";
import { agentOS, generateApiKey, setup, type RunningServer } from "agentvm";
import { createClient } from "agentvm/client";
import { parseLogLevel } from "../src/log.ts";
import { tempDataDir, waitFor } from "./helpers.ts";

delete process.env.AGENTVM_API_KEYS;

const apiKey = generateApiKey();
const registry = setup({ use: { vm: agentOS() } });
let server: RunningServer;
const lines: Record<string, unknown>[] = [];
const rawLines: string[] = [];
const realWrite = process.stdout.write.bind(process.stdout);

before(async () => {
  process.stdout.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    const text = String(chunk);
    if (text.startsWith('{"time"')) {
      rawLines.push(text);
      lines.push(JSON.parse(text) as Record<string, unknown>);
      return true;
    }
    return (realWrite as (...args: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stdout.write;
  server = await registry.start({ port: 0, dataDir: await tempDataDir("agentvm-access-log-"), handleSignals: false, logLevel: "info", auth: { apiKeys: [apiKey] } });
});
after(async () => {
  await server?.close();
  process.stdout.write = realWrite;
});

function requestLines(): Record<string, unknown>[] {
  return lines.filter((line) => line.msg === "request");
}

it("one JSON line per request: route template, VM, status, duration; no token or key in any line", async () => {
  const client = createClient<typeof registry>({ endpoint: server.url, token: apiKey });
  const vm = client.vm.getOrCreate("logged");
  await vm.writeFile("/home/agentos/a.txt", "a");
  await fetch(`${server.url}/api/vm/logged/status`, { headers: { authorization: `Bearer ${apiKey}` } }).then((response) => response.body?.cancel());
  await fetch(`${server.url}/api/vm/logged/status`).then((response) => response.body?.cancel()); // no credential: 401
  const preview = await vm.createSignedPreviewUrl(3000);
  await fetch(preview.url!).then((response) => response.body?.cancel()); // nothing listens: 502
  const find = (route: string, status: number) => requestLines().find((line) => line.route === route && line.status === status);
  // Lines are written when each response closes, which may come after the client has its answer.
  await waitFor(() => find("/preview/{token}/*", 502), "the last request's log line", 10_000);
  const write = find("/api/{definition}/{key}/actions/writeFile", 200);
  assert.ok(write, JSON.stringify(requestLines()));
  assert.equal(write.listener, "api");
  assert.equal(write.method, "POST");
  assert.equal(write.definition, "vm");
  assert.equal(write.key, "logged");
  assert.equal(typeof write.durationMs, "number");
  assert.equal(write.level, "info");
  assert.ok(!Number.isNaN(Date.parse(String(write.time))));
  assert.ok(find("/api/{definition}/{key}/status", 200));
  assert.ok(find("/api/{definition}/{key}/status", 401));
  const previewLine = find("/preview/{token}/*", 502);
  assert.ok(previewLine, JSON.stringify(requestLines()));
  assert.equal(previewLine.listener, "preview");
  for (const text of rawLines) {
    assert.ok(!text.includes(preview.token), "a preview token was logged");
    assert.ok(!text.includes(apiKey), "an API key was logged");
  }
});

it("the level comes from the option, else AGENTVM_LOG_LEVEL, else warn; a bad one is INVALID_ARGUMENT", () => {
  assert.equal(parseLogLevel(undefined, undefined), "warn");
  assert.equal(parseLogLevel(undefined, "INFO"), "info");
  assert.equal(parseLogLevel("error", "debug"), "error");
  assert.throws(() => parseLogLevel(undefined, "loud"), (error: { code?: string; message: string }) => error.code === "INVALID_ARGUMENT" && /AGENTVM_LOG_LEVEL/.test(error.message));
  assert.throws(() => parseLogLevel("verbose"), /start options\.logLevel/);
});
