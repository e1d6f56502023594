/**
 * The dashboard page (`/`) in headless Chromium against the real server: it
 * lists VMs, shows a process's log, makes a preview link that serves the
 * guest and revokes it, and signs in with an API key when the server has one.
 * On failure the page is saved as a screenshot under test-output/.
 */
import { before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import type { Browser, Page } from "playwright-core";
import { browserSkip, GuestOutput, launchChromium, newPage, rawRequest, REPO, startGuestServer, startPreviewServer, waitFor, type PreviewServer } from "./browser/support.ts";

const PORT = 3000;
const GUEST = `
console.log("dashboard-log-line from the guest");
require("http").createServer((req, res) => res.end("served through the dashboard's preview link")).listen(${PORT});
`;

/** Runs `work` on a fresh page; on failure saves a screenshot named after the test. */
async function onPage(browser: Browser, name: string, work: (page: Page) => Promise<void>): Promise<void> {
  const page = await newPage(browser);
  try {
    await work(page);
  } catch (error) {
    const dir = join(REPO, "test-output");
    await mkdir(dir, { recursive: true });
    await page.screenshot({ path: join(dir, `dashboard-${name}.png`), fullPage: true }).catch(() => undefined);
    throw error;
  }
}

describe("the dashboard in headless Chromium", { skip: browserSkip }, () => {
  let browser: Browser;
  let server: PreviewServer;
  let pid = 0;

  before(async () => {
    server = await startPreviewServer();
    const vm = server.vm("dash-a");
    await vm.mkdir("/home/agentos", { recursive: true });
    pid = await startGuestServer(vm, await GuestOutput.open(vm), GUEST, PORT);
    await server.vm("dash-b").writeFile("/home/agentos/note.txt", "a second VM");
    browser = await launchChromium();
  });

  test("the page is served with headers that keep it from being framed or sniffed", async () => {
    const page = await rawRequest(server.port, { path: "/", headers: { host: `localhost:${server.port}` } });
    assert.equal(page.status, 200);
    assert.match(String(page.headers["content-type"]), /^text\/html/);
    assert.match(String(page.headers["content-security-policy"]), /frame-ancestors 'none'/);
    assert.equal(page.headers["x-content-type-options"], "nosniff");
    const other = await rawRequest(server.port, { path: "/dashboard/../package.json", headers: { host: `localhost:${server.port}` } });
    assert.notEqual(other.status, 200);
    // The preview origin serves previews only, never the dashboard.
    const onPreviewOrigin = await rawRequest(server.previewPort, { path: "/", headers: { host: `localhost:${server.previewPort}` } });
    assert.notEqual(onPreviewOrigin.status, 200);
  });

  test("lists VMs and shows a process's log", async () => {
    await onPage(browser, "logs", async (page) => {
      await page.goto(`${server.url}/`);
      await page.locator("#vm-list button", { hasText: "dash-b" }).waitFor();
      await page.locator("#vm-list button", { hasText: "dash-a" }).click();
      const row = page.locator(`#processes tr[data-pid="${pid}"]`);
      await row.waitFor();
      assert.match(await row.innerText(), /node .*running/s);
      await row.getByRole("button", { name: "Logs" }).click();
      await page.locator("#log", { hasText: "dashboard-log-line from the guest" }).waitFor();
    });
  });

  test("makes a preview link that serves the guest, then revokes it", async () => {
    await onPage(browser, "preview", async (page) => {
      await page.goto(`${server.url}/`);
      await page.locator("#vm-list button", { hasText: "dash-a" }).click();
      const port = page.locator(`#ports li[data-port="${PORT}"]`);
      await port.getByRole("button", { name: "Preview link" }).click();
      const href = await port.locator("a.preview-link").getAttribute("href");
      assert.ok(href?.startsWith(server.previewUrl), `preview link ${href} is on the preview origin ${server.previewUrl}`);
      const preview = await newPage(browser);
      await preview.goto(href!);
      assert.equal(await preview.locator("body").innerText(), "served through the dashboard's preview link");

      const prefix = href!.split("/preview/")[1]!.slice(0, 6);
      const tokenRow = page.locator(`#previews tr[data-token="${prefix}"]`);
      await tokenRow.getByRole("button", { name: "Revoke" }).click();
      await tokenRow.waitFor({ state: "detached" });
      const revoked = await preview.goto(href!);
      assert.equal(revoked?.status(), 403);
    });
  });
});

describe("the dashboard on a server with an API key", { skip: browserSkip }, () => {
  const key = "dashboard-test-key-0123456789abcdef";
  let browser: Browser;
  let server: PreviewServer;

  before(async () => {
    server = await startPreviewServer({ auth: { apiKeys: [key] } });
    await server.vm("keyed").writeFile("/home/agentos/a.txt", "x");
    browser = await launchChromium();
  });

  test("asks for the key, refuses a wrong one, and lists VMs with the right one", async () => {
    await onPage(browser, "sign-in", async (page) => {
      await page.goto(`${server.url}/`);
      await page.locator("#sign-in").waitFor();
      await page.fill("#credential", "not-the-key-0123456789abcdefghij");
      await page.click("#sign-in button");
      await page.locator("#server-state", { hasText: "refused" }).waitFor();
      await page.fill("#credential", key);
      await page.click("#sign-in button");
      await page.locator("#vm-list button", { hasText: "keyed" }).waitFor();
      await waitFor(async () => (await page.locator("#sign-in").isHidden()) || undefined, "the sign-in form to hide");
    });
  });
});
