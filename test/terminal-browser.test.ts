/**
 * The client's openTerminal in a real browser (headless Chromium): the client
 * bundled for the browser, a page on an allowed origin typing into bash over
 * the browser's own WebSocket (credential as a subprotocol), and a page on a
 * foreign origin refused without a terminal ever starting.
 */
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { before, describe, test } from "node:test";
import type { Browser } from "playwright-core";
import { agentOS, generateApiKey, setup, type RunningServer } from "agentvm";
import { createClient } from "agentvm/client";
import { browserSkip, launchChromium, newPage, onCleanup, REPO, tempDir } from "./browser/support.ts";

describe("terminals in headless Chromium", { skip: browserSkip }, () => {
  let browser: Browser;
  let server: RunningServer;
  let hostPort = 0;
  const apiKey = generateApiKey();
  const registry = setup({ use: { vm: agentOS() } });

  before(async () => {
    const esbuild = await import("esbuild-wasm");
    const bundle = await esbuild.build({ entryPoints: [`${REPO}/src/client/index.ts`], bundle: true, format: "esm", platform: "browser", conditions: ["agentvm-source"], write: false });
    const clientCode = bundle.outputFiles[0]!.text;
    // The page reads its settings from its own URL, so one page serves both origins.
    const host = createServer((request, response) => {
      if (request.url === "/client.js") return void response.writeHead(200, { "content-type": "text/javascript" }).end(clientCode);
      response.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(`<!doctype html><html><body><pre id="out">pending</pre><script type="module">
        import { createClient } from "/client.js";
        const settings = JSON.parse(decodeURIComponent(location.hash.slice(1)));
        const report = (value) => (document.getElementById("out").textContent = JSON.stringify(value));
        try {
          const agent = createClient({ endpoint: settings.endpoint, token: settings.token }).vm.getOrCreate(settings.key);
          const terminal = await agent.openTerminal({ cols: 90, rows: 25 });
          let text = "";
          const decoder = new TextDecoder();
          terminal.onData((data) => (text += decoder.decode(data, { stream: true })));
          terminal.write("stty size; echo browser-$((40+2))\\r");
          const deadline = Date.now() + 15000;
          while (!text.includes("browser-42") && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 25));
          terminal.write("exit 4\\r");
          const exit = await terminal.exited;
          report({ ok: true, text, exit });
        } catch (error) {
          report({ ok: false, code: error.code, message: error.message });
        }
      </script></body></html>`);
    });
    await new Promise<void>((resolve) => host.listen(0, "127.0.0.1", resolve));
    onCleanup(() => new Promise((resolve) => host.close(resolve)));
    onCleanup(() => host.closeAllConnections());
    hostPort = (host.address() as { port: number }).port;
    const dataDir = await tempDir("agentvm-terminal-browser-");
    // 127.0.0.1:<port> is allowed; localhost:<port> is the same page on another, foreign origin.
    server = await registry.start({ port: 0, dataDir, handleSignals: false, auth: { apiKeys: [apiKey] }, allowedOrigins: [`http://127.0.0.1:${hostPort}`] });
    onCleanup(() => server.close());
    browser = await launchChromium();
  });

  async function run(origin: string, key: string): Promise<{ ok: boolean; text?: string; exit?: unknown; code?: string; message?: string }> {
    const page = await newPage(browser);
    const settings = encodeURIComponent(JSON.stringify({ endpoint: server.url, token: server.createToken({ key, actions: ["openTerminal"] }).token, key }));
    await page.goto(`${origin}/#${settings}`);
    await page.waitForFunction(`document.getElementById("out").textContent !== "pending"`);
    return JSON.parse((await page.textContent("#out")) ?? "{}");
  }

  test("a page on an allowed origin types into bash and reads back, with a token as the subprotocol", async () => {
    const result = await run(`http://127.0.0.1:${hostPort}`, "browser-allowed");
    assert.equal(result.ok, true, String(result.message));
    assert.match(result.text!, /25 90/);
    assert.match(result.text!, /browser-42/);
    assert.deepEqual(result.exit, { exitCode: 4, signal: null });
  });

  test("a page on a foreign origin gets no terminal (cross-site WebSocket hijacking)", async () => {
    const result = await run(`http://localhost:${hostPort}`, "browser-foreign");
    assert.equal(result.ok, false);
    // The browser hides why (no CORS on the API), so the client says it could not connect; the server started nothing.
    assert.equal(result.code, "SERVER_UNREACHABLE", String(result.message));
    const processes = await createClient<typeof registry>({ endpoint: server.url, token: apiKey }).vm.getOrCreate("browser-foreign").listProcesses();
    assert.deepEqual(processes, []);
  });
});
