/**
 * A Vite dev server running INSIDE a VM, its page loaded in headless Chromium
 * through a subdomain preview, and hot module replacement over the preview's
 * WebSocket after `writeFile` changes a source file.
 *
 * The guest cannot load native addons or run binaries other than `node`, so
 * Vite 7 gets its bundlers as pure WebAssembly: `esbuild-wasm` installed as
 * `node_modules/esbuild` (its Node API runs the wasm in a `node` child, which
 * the kernel allows) and `@rollup/wasm-node` as `node_modules/rollup`.
 *
 * Subdomain mode, not path mode: Vite serves root-relative URLs (/@vite/client,
 * /src/main.ts), which on `<token>.preview.localhost` are the guest's own root.
 * In path mode Vite's `base` cannot help, because the gateway strips
 * `/preview/<token>` before the guest sees a request, while a Vite with that
 * base refuses every request that does not start with it.
 *
 * Vite config needed: `server.hmr.clientPort` = the gateway's port (the HMR
 * client otherwise dials Vite's own port, 5173, which the browser cannot
 * reach). No `allowedHosts`: the guest sees `Host: localhost:5173`.
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { cp, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Browser, Page } from "playwright-core";
import { browserSkip, GuestOutput, installIntoVm, launchChromium, onCleanup, REPO, spawnListening, startPreviewServer, waitFor, type PreviewServer } from "./browser/support.ts";

const KEY = "vite";
const APP = "/home/agentos/app";
const VITE_PORT = 5173;
const FIXTURE = join(REPO, "test/browser/vite-app");

describe("Vite dev server in a VM through a preview", { skip: browserSkip }, () => {
  let server: PreviewServer;
  let browser: Browser;
  let page: Page;
  let output: GuestOutput;
  let vitePid = 0;
  let token = "";
  const sockets: string[] = [];

  before(async () => {
    server = await startPreviewServer();
    const vm = server.vm(KEY);
    await vm.mkdir(`${APP}/src`, { recursive: true });
    const root = server.root(KEY);
    // Fixture sources are stored as .ts.txt so the repo's typecheck (no DOM types) leaves them alone.
    await cp(join(FIXTURE, "index.html"), join(root, APP, "index.html"));
    await cp(join(FIXTURE, "style.css"), join(root, APP, "style.css"));
    for (const file of ["main.ts", "message.ts"]) await writeFile(join(root, APP, "src", file), await readFile(join(FIXTURE, "src", `${file}.txt`)));
    await vm.writeFile(
      `${APP}/vite.config.mjs`,
      `export default {
  clearScreen: false,
  server: { port: ${VITE_PORT}, strictPort: true, hmr: { clientPort: ${server.previewPort} } },
};
`,
    );
    const installed = await installIntoVm(root, APP.slice(1), ["vite"], { esbuild: "esbuild-wasm", rollup: "@rollup/wasm-node" });
    assert.ok(installed.includes("esbuild") && installed.includes("rollup"), `installed ${installed}`);

    output = await GuestOutput.open(vm);
    vitePid = await spawnListening(vm, output, ["node_modules/vite/bin/vite.js"], VITE_PORT, { cwd: APP, timeoutMs: 40_000 });
    token = (await vm.createSignedPreviewUrl(VITE_PORT)).token;

    browser = await launchChromium();
    const context = await browser.newContext();
    onCleanup(() => context.close());
    page = await context.newPage();
    page.setDefaultTimeout(30_000);
    page.on("websocket", (socket) => sockets.push(socket.url()));
  });

  test("the page loads through <token>.preview.localhost, with TypeScript compiled by esbuild-wasm inside the VM", async () => {
    const response = await page.goto(`http://${token}.preview.localhost:${server.previewPort}/`);
    assert.equal(response?.status(), 200, `vite output: ${output.of(vitePid)}`);
    await page.locator("#app", { hasText: "version one" }).waitFor();
    // A browser cannot run `: string` annotations: the module it ran came out of esbuild.
    const served = await page.evaluate(`fetch("/src/main.ts").then((r) => r.text())`);
    assert.ok(typeof served === "string" && served.includes("render") && !served.includes("text: string"), `served main.ts: ${String(served).slice(0, 300)}`);
    // …which ran as Vite's child: `node node_modules/esbuild/bin/esbuild --service…`, spawned through the kernel.
    const processes = await server.vm(KEY).listProcesses();
    const esbuild = processes.find((info) => info.ppid === vitePid && info.args.some((arg) => arg.includes("esbuild")));
    assert.ok(esbuild, `no esbuild child of vite: ${JSON.stringify(processes.map(({ pid, ppid, command, args }) => ({ pid, ppid, command, args })))}`);
  });

  test("Vite's HMR WebSocket connects through the preview", async () => {
    await waitFor(() => sockets.some((url) => url.startsWith(`ws://${token}.preview.localhost:${server.previewPort}/`)), () => `the HMR socket (seen: ${sockets})`, 20_000);
    await page.evaluate(`window.__beforeEdit = "still here"`);
  });

  test("writeFile on a source file updates the page in place (HMR, no reload)", async () => {
    await server.vm(KEY).writeFile(`${APP}/src/message.ts`, `export const message: string = "version two";\n`);
    await page.locator("#app", { hasText: "version two" }).waitFor();
    // Same document: the module was swapped, the page was not reloaded.
    assert.equal(await page.evaluate(`window.__beforeEdit`), "still here");
    assert.match(output.of(vitePid), /hmr update/i);

    await server.vm(KEY).writeFile(`${APP}/src/message.ts`, `export const message: string = "version three";\n`);
    await page.locator("#app", { hasText: "version three" }).waitFor();
    assert.equal(await page.evaluate(`window.__beforeEdit`), "still here");
  });
});
