/**
 * Preview tokens against the real server (DESIGN §3 "Preview URLs"): what
 * createSignedPreviewUrl returns, its TTL, port and count rules over the typed
 * client, how tokens are stored (SHA-256 only), revocation, the periodic and
 * the lazy deletion of expired rows, and tokens surviving sleep/wake and a
 * server restart.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { FORBIDDEN_BODY, GuestOutput, sandboxPids, startGuestServer, startPreviewServer, waitFor, type PreviewServer } from "./browser/support.ts";

const HOUR = 3600 * 1000;
const TOKEN = /^[a-z2-7]{32}$/;
const sha256 = (text: string) => createHash("sha256").update(text).digest("hex");

const HELLO_SERVER = (port: number) => `require("http").createServer((req, res) => res.end("hello " + req.url)).listen(${port});`;

async function rejection(promise: Promise<unknown>): Promise<Error & { code?: string }> {
  try {
    await promise;
  } catch (error) {
    return error as Error & { code?: string };
  }
  throw new Error("expected a rejection, but it resolved");
}

/** Every preview row, read with a separate SQLite connection (as anyone with the file could). */
function previewRows(server: PreviewServer): Record<string, unknown>[] {
  const db = new DatabaseSync(join(server.dataDir, "agentvm.sqlite"), { readOnly: true });
  try {
    return db.prepare("SELECT * FROM previews").all() as Record<string, unknown>[];
  } finally {
    db.close();
  }
}

function wakeCount(server: PreviewServer, key: string): number {
  const db = new DatabaseSync(join(server.dataDir, "agentvm.sqlite"), { readOnly: true });
  try {
    const row = db.prepare("SELECT wake_count FROM vms WHERE definition = 'vm' AND key = ?").get(key) as { wake_count: number } | undefined;
    return Number(row?.wake_count ?? -1);
  } finally {
    db.close();
  }
}

const server = await startPreviewServer({ config: { preview: { maxExpiresInSeconds: 7200, maxActiveTokens: 3 } }, preview: { sweepIntervalMs: 100 } });

describe("createSignedPreviewUrl", () => {
  const vm = server.vm("tokens");

  test("returns { url, path, token, port, expiresAt }: a 160-bit URL-safe token under /preview/, default TTL when omitted or 0", async () => {
    await vm.expireAllPreviewUrls();
    const before = Date.now();
    const omitted = await vm.createSignedPreviewUrl(3000);
    const zero = await vm.createSignedPreviewUrl(3000, 0);
    const short = await vm.createSignedPreviewUrl(8080, 120);
    const after = Date.now();
    assert.deepEqual(Object.keys(omitted).sort(), ["expiresAt", "path", "port", "token", "url"]);
    assert.equal(omitted.url, `${server.previewUrl}${omitted.path}`, "url is on the preview origin");
    for (const preview of [omitted, zero, short]) {
      // 32 base32 characters are 160 bits; lowercase so that it survives as a DNS label.
      assert.match(preview.token, TOKEN);
      assert.equal(encodeURIComponent(preview.token), preview.token);
      assert.equal(preview.path, `/preview/${preview.token}/`);
    }
    assert.equal(new Set([omitted.token, zero.token, short.token]).size, 3, "tokens must differ");
    assert.equal(omitted.port, 3000);
    assert.equal(short.port, 8080);
    for (const preview of [omitted, zero]) {
      assert.ok(preview.expiresAt >= before + HOUR && preview.expiresAt <= after + HOUR, `default TTL is 3600 s, got expiresAt ${preview.expiresAt - before} ms ahead`);
    }
    assert.ok(short.expiresAt >= before + 120_000 && short.expiresAt <= after + 120_000, `ttl 120 s, got ${short.expiresAt - before} ms`);
    await vm.expireAllPreviewUrls();
  });

  test("negative, NaN and infinite TTLs are PREVIEW_TTL_INVALID (NaN and Infinity too, across the wire)", async () => {
    await vm.expireAllPreviewUrls();
    for (const ttl of [-1, -0.5, Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
      const error = await rejection(vm.createSignedPreviewUrl(3000, ttl));
      assert.equal(error.code, "PREVIEW_TTL_INVALID", `ttl ${ttl}: ${error.message}`);
    }
    assert.deepEqual(await vm.listPreviewUrls(), [], "a refused TTL must not leave a token behind");
  });

  test("a TTL above preview.maxExpiresInSeconds is PREVIEW_TTL_TOO_LONG and names the knob; the cap itself is allowed", async () => {
    await vm.expireAllPreviewUrls();
    const error = await rejection(vm.createSignedPreviewUrl(3000, 7201));
    assert.equal(error.code, "PREVIEW_TTL_TOO_LONG");
    assert.match(error.message, /preview\.maxExpiresInSeconds/);
    const atCap = await vm.createSignedPreviewUrl(3000, 7200);
    assert.ok(atCap.expiresAt > Date.now() + 7100_000);
    await vm.expireAllPreviewUrls();
  });

  test("a port outside 1–65535 or not an integer is INVALID_ARGUMENT", async () => {
    for (const port of [0, -1, 65536, 1.5, Number.NaN, "3000" as unknown as number, undefined as unknown as number]) {
      const error = await rejection(vm.createSignedPreviewUrl(port));
      assert.equal(error.code, "INVALID_ARGUMENT", `port ${String(port)}: ${error.message}`);
    }
    const edge = await vm.createSignedPreviewUrl(65535);
    assert.equal(edge.port, 65535);
    await vm.expireAllPreviewUrls();
  });

  test("more than preview.maxActiveTokens active tokens is PREVIEW_TOKEN_LIMIT; expired and revoked ones do not count", async () => {
    await vm.expireAllPreviewUrls();
    const first = await vm.createSignedPreviewUrl(3000);
    await vm.createSignedPreviewUrl(3000);
    const dying = await vm.createSignedPreviewUrl(3000, 0.3);
    const error = await rejection(vm.createSignedPreviewUrl(3000));
    assert.equal(error.code, "PREVIEW_TOKEN_LIMIT");
    assert.match(error.message, /preview\.maxActiveTokens/);
    // Another VM has its own count.
    const other = await server.vm("tokens-other").createSignedPreviewUrl(3000);
    assert.match(other.token, TOKEN);

    await waitFor(() => Date.now() > dying.expiresAt, "the short token to expire", 5_000);
    const replacement = await vm.createSignedPreviewUrl(3000);
    assert.equal(await vm.expireSignedPreviewUrl(first.token), true);
    await vm.createSignedPreviewUrl(3000);
    assert.equal((await rejection(vm.createSignedPreviewUrl(3000))).code, "PREVIEW_TOKEN_LIMIT");
    assert.equal(await vm.expireSignedPreviewUrl(replacement.token), true);
    await vm.expireAllPreviewUrls();
  });

  test("list shows prefixes, not tokens; expire revokes at once (403); expireAll per port and for the VM", async () => {
    const guest = server.vm("listing");
    await guest.expireAllPreviewUrls();
    const output = await GuestOutput.open(guest);
    await startGuestServer(guest, output, HELLO_SERVER(3000), 3000);
    const a = await guest.createSignedPreviewUrl(3000);
    const b = await guest.createSignedPreviewUrl(3000);
    const c = await guest.createSignedPreviewUrl(4000);

    const ok = await fetch(`${server.url}${a.path}x`);
    assert.equal(ok.status, 200);
    assert.equal(await ok.text(), "hello /x");

    const listed = await guest.listPreviewUrls();
    assert.equal(listed.length, 3);
    for (const info of listed) {
      assert.ok(info.tokenPrefix.length > 0 && info.tokenPrefix.length < 16, `prefix ${info.tokenPrefix}`);
      assert.ok(!JSON.stringify(info).includes(a.token) && !JSON.stringify(info).includes(b.token));
    }
    assert.deepEqual(listed.map((info) => info.port).sort(), [3000, 3000, 4000]);
    const used = listed.find((info) => a.token.startsWith(info.tokenPrefix) && info.lastUsedAt !== null);
    assert.ok(used, `the used token should have lastUsedAt: ${JSON.stringify(listed)}`);

    assert.equal(await guest.expireSignedPreviewUrl(a.token), true);
    assert.equal(await guest.expireSignedPreviewUrl(a.token), false, "revoking twice reports it was no longer active");
    const revoked = await fetch(`${server.url}${a.path}x`);
    assert.equal(revoked.status, 403);
    assert.equal(await revoked.text(), FORBIDDEN_BODY);
    // A token of another VM cannot be revoked from this one.
    assert.equal(await server.vm("listing-other").expireSignedPreviewUrl(b.token), false);
    assert.equal((await fetch(`${server.url}${b.path}`)).status, 200);

    assert.equal(await guest.expireAllPreviewUrls(4000), 1);
    assert.equal((await fetch(`${server.url}${c.path}`)).status, 403);
    assert.equal((await fetch(`${server.url}${b.path}`)).status, 200, "expireAll(4000) must leave port 3000's token");
    assert.equal(await guest.expireAllPreviewUrls(), 1);
    assert.equal((await fetch(`${server.url}${b.path}`)).status, 403);
    assert.deepEqual(await guest.listPreviewUrls(), []);
  });
});

describe("storage", () => {
  test("SQLite holds only the token's SHA-256: no table and no database file contains the token text", async () => {
    const vm = server.vm("hashing");
    const previews = [await vm.createSignedPreviewUrl(3000), await vm.createSignedPreviewUrl(3001, 60)];
    const rows = previewRows(server);
    for (const preview of previews) {
      const row = rows.find((candidate) => candidate.token_hash === sha256(preview.token));
      assert.ok(row, `no row keyed by sha256(token) for ${preview.port}`);
      assert.equal(row.port, preview.port);
      assert.equal(row.expires_at, preview.expiresAt);
      for (const value of Object.values(row)) {
        assert.ok(!String(value).includes(preview.token), "a column holds the token");
      }
    }
    // Every table, every column.
    const db = new DatabaseSync(join(server.dataDir, "agentvm.sqlite"), { readOnly: true });
    try {
      const tables = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all() as { name: string }[];
      for (const { name } of tables) {
        const text = JSON.stringify(db.prepare(`SELECT * FROM "${name}"`).all());
        for (const preview of previews) assert.ok(!text.includes(preview.token), `table ${name} contains a token`);
      }
    } finally {
      db.close();
    }
    // And the bytes on disk, write-ahead log included.
    for (const file of ["agentvm.sqlite", "agentvm.sqlite-wal", "agentvm.sqlite-shm"]) {
      const bytes = await readFile(join(server.dataDir, file)).catch(() => Buffer.alloc(0));
      for (const preview of previews) assert.equal(bytes.indexOf(preview.token), -1, `${file} contains a token`);
    }
    await vm.expireAllPreviewUrls();
  });

  test("the periodic sweep deletes expired rows without anyone presenting the token", async () => {
    const vm = server.vm("sweep");
    const keep = await vm.createSignedPreviewUrl(3000);
    const short = await vm.createSignedPreviewUrl(3000, 0.4);
    const hash = sha256(short.token);
    assert.ok(previewRows(server).some((row) => row.token_hash === hash), "the row should exist right after creation");
    await waitFor(() => !previewRows(server).some((row) => row.token_hash === hash), "the sweep (every 100 ms) to delete the expired row", 10_000);
    assert.ok(previewRows(server).some((row) => row.token_hash === sha256(keep.token)), "the sweep must keep live tokens");
    await vm.expireAllPreviewUrls();
  });

  test("without a sweep due, an expired token is refused (403) and its row deleted when presented", async () => {
    // Default sweep interval (60 s): it cannot run during this test.
    const lazy = await startPreviewServer();
    const vm = lazy.vm("lazy");
    const short = await vm.createSignedPreviewUrl(3000, 0.3);
    const hash = sha256(short.token);
    await waitFor(() => Date.now() > short.expiresAt + 20, "the token to expire", 5_000);
    assert.ok(previewRows(lazy).some((row) => row.token_hash === hash), "no sweep has run, so the expired row is still there");
    assert.deepEqual(await vm.listPreviewUrls(), [], "an expired token is not listed");
    const response = await fetch(`${lazy.url}${short.path}`);
    assert.equal(response.status, 403);
    assert.equal(await response.text(), FORBIDDEN_BODY);
    assert.ok(!previewRows(lazy).some((row) => row.token_hash === hash), "presenting an expired token deletes its row");
    await lazy.close();
  });
});

describe("lifetime across sleep/wake and restarts", () => {
  test("a token survives sleep; a preview request wakes the sleeping VM; the token then reaches a restarted app", async () => {
    const sleepy = await startPreviewServer({ config: { sleepAfterMs: 200 } });
    const vm = sleepy.vm("sleepy");
    const preview = await vm.createSignedPreviewUrl(3000);
    const root = sleepy.root("sleepy");
    const wakesBefore = wakeCount(sleepy, "sleepy");
    assert.ok(wakesBefore >= 0, "the VM should have a row once an action ran");
    // Asleep, as the server reports it without waking the VM; and no sandbox of it left on the host.
    const asleep = async () => !(((await (await fetch(`${sleepy.url}/api/vm/sleepy/status`)).json()) as { value: { awake: boolean } }).value.awake);
    await waitFor(asleep, "the idle VM to sleep (sleepAfterMs: 200)", 15_000);
    assert.deepEqual(await sandboxPids(root), []);

    const woken = await fetch(`${sleepy.url}${preview.path}`);
    const page = await woken.text();
    // The VM woke to answer (a sleeping VM has no socket table to say "nothing listening").
    assert.equal(woken.status, 502, page);
    assert.match(page, /Nothing is listening/);
    assert.equal(wakeCount(sleepy, "sleepy"), wakesBefore + 1, "the preview request should have woken the VM once");

    // Files and tokens stayed; start the app again and the same URL reaches it.
    assert.equal((await vm.listPreviewUrls()).length, 1);
    const output = await GuestOutput.open(vm);
    await startGuestServer(vm, output, HELLO_SERVER(3000), 3000);
    assert.ok((await sandboxPids(root)).length > 0, "an awake VM's sandboxes should be visible, or the sleep check above proves nothing");
    const answer = await fetch(`${sleepy.url}${preview.path}again`);
    assert.equal(answer.status, 200);
    assert.equal(await answer.text(), "hello /again");
    await sleepy.close();
  });

  test("tokens survive a server restart on the same data directory; revoked ones stay revoked", async () => {
    const first = await startPreviewServer();
    const vm = first.vm("restart");
    const kept = await vm.createSignedPreviewUrl(3000);
    const revoked = await vm.createSignedPreviewUrl(3000);
    assert.equal(await vm.expireSignedPreviewUrl(revoked.token), true);
    await first.close();

    const second = await startPreviewServer({ dataDir: first.dataDir });
    const again = second.vm("restart");
    const output = await GuestOutput.open(again);
    await startGuestServer(again, output, HELLO_SERVER(3000), 3000);
    const response = await fetch(`${second.url}${kept.path}after-restart?q=1`);
    assert.equal(response.status, 200);
    assert.equal(await response.text(), "hello /after-restart?q=1");
    const refused = await fetch(`${second.url}${revoked.path}`);
    assert.equal(refused.status, 403);
    assert.equal(await refused.text(), FORBIDDEN_BODY);
    const listed = await again.listPreviewUrls();
    assert.equal(listed.length, 1);
    assert.ok(kept.token.startsWith(listed[0]!.tokenPrefix));
    await second.close();
  });
});
