/**
 * Revoking scoped tokens one by one (by id or by the token), over HTTP and in
 * code; revocations kept in SQLite across a restart; a destroyed VM's tokens
 * ending with it.
 */
import assert from "node:assert/strict";
import { after, before, it } from "node:test";
import { agentOS, generateApiKey, setup, type RunningServer } from "agentvm";
import { tempDataDir } from "./helpers.ts";

delete process.env.AGENTVM_API_KEYS;

const apiKey = generateApiKey();
const registry = setup({ use: { vm: agentOS() } });
let server: RunningServer;
let dataDir: string;

before(async () => {
  dataDir = await tempDataDir("agentvm-revocation-");
  server = await registry.start({ port: 0, dataDir, handleSignals: false, auth: { apiKeys: [apiKey] } });
});
after(() => server?.close());

async function call(path: string, credential: string, init: RequestInit = {}): Promise<{ status: number; body: { value?: unknown; error?: { code: string; message: string } } }> {
  const response = await fetch(`${server.url}${path}`, { ...init, headers: { authorization: `Bearer ${credential}`, ...(init.headers as Record<string, string>) } });
  return { status: response.status, body: (await response.json()) as { value?: unknown; error?: { code: string; message: string } } };
}

it("a token revoked by id is refused at once, by every check; revoking twice says so", async () => {
  const minted = server.createToken({ key: "rev", actions: ["status"] });
  assert.match(minted.id, /^[A-Za-z0-9_-]{22}$/);
  assert.equal((await call("/api/vm/rev/status", minted.token)).status, 200);
  const other = server.createToken({ key: "rev", actions: ["status"] });
  assert.equal(server.revokeToken(minted.id), true);
  const refused = await call("/api/vm/rev/status", minted.token);
  assert.equal(refused.status, 401);
  assert.equal(refused.body.error?.code, "UNAUTHENTICATED");
  assert.match(refused.body.error!.message, /revoked/);
  assert.equal(server.revokeToken(minted.id), false);
  assert.equal((await call("/api/vm/rev/status", other.token)).status, 200, "another token for the same VM still works");
});

it("DELETE /api/tokens/{id} revokes with an API key (by id or by the token itself); a token cannot revoke", async () => {
  const first = server.createToken({ key: "rev2" });
  const second = server.createToken({ key: "rev2" });
  const byToken = await call(`/api/tokens/${first.id}`, second.token, { method: "DELETE" });
  assert.equal(byToken.status, 403);
  assert.equal(byToken.body.error?.code, "FORBIDDEN");
  assert.deepEqual((await call(`/api/tokens/${first.id}`, apiKey, { method: "DELETE" })).body, { value: { revoked: true } });
  assert.deepEqual((await call(`/api/tokens/${encodeURIComponent(second.token)}`, apiKey, { method: "DELETE" })).body, { value: { revoked: true } });
  for (const token of [first.token, second.token]) assert.equal((await call("/api/vm/rev2/status", token)).status, 401);
  const bad = await call("/api/tokens/not-a-token-id", apiKey, { method: "DELETE" });
  assert.equal(bad.status, 400);
  assert.equal(bad.body.error?.code, "INVALID_ARGUMENT");
  // A forged token is not revocable (nothing to revoke), and says why.
  const forged = await call(`/api/tokens/${encodeURIComponent(`${first.token.slice(0, -4)}AAAA`)}`, apiKey, { method: "DELETE" });
  assert.equal(forged.status, 401);
});

it("a destroyed VM's tokens end with it: the key's fresh VM needs a new token", async () => {
  const before = server.createToken({ key: "doomed", actions: ["writeFile", "status", "destroy"] });
  assert.equal((await call("/api/vm/doomed/actions/writeFile", before.token, { method: "POST", headers: { "content-type": "application/json" }, body: '["/home/agentos/a", "a"]' })).status, 200);
  assert.equal((await call("/api/vm/doomed?confirm=doomed", before.token, { method: "DELETE" })).status, 200);
  const after = await call("/api/vm/doomed/status", before.token);
  assert.equal(after.status, 401);
  assert.match(after.body.error!.message, /destroyed/);
  await new Promise((resolve) => setTimeout(resolve, 5)); // a new token is issued after the destroy
  const fresh = server.createToken({ key: "doomed", actions: ["status"] });
  assert.equal((await call("/api/vm/doomed/status", fresh.token)).status, 200);
});

it("revocations are in SQLite: they hold after a restart", async () => {
  const minted = server.createToken({ key: "persist", actions: ["status"] });
  assert.equal(server.revokeToken(minted.token), true);
  await server.close();
  server = await registry.start({ port: 0, dataDir, handleSignals: false, auth: { apiKeys: [apiKey] } });
  assert.equal((await call("/api/vm/persist/status", minted.token)).status, 401);
  assert.equal(server.revokeToken(minted.id), false, "already revoked before the restart");
});

it('a "*" token does not cover setLifecycle (nor destroy): a token must list it', async () => {
  const all = server.createToken({ key: "bounds" });
  const refused = await call("/api/vm/bounds/actions/setLifecycle", all.token, { method: "POST", headers: { "content-type": "application/json" }, body: '[{"maxLifetimeSeconds": 100000}]' });
  assert.equal(refused.status, 403);
  assert.equal(refused.body.error?.code, "FORBIDDEN");
  const listed = server.createToken({ key: "bounds", actions: ["setLifecycle"] });
  const set = await call("/api/vm/bounds/actions/setLifecycle", listed.token, { method: "POST", headers: { "content-type": "application/json" }, body: '[{"maxLifetimeSeconds": 100000}]' });
  assert.equal(set.status, 200);
  assert.equal((set.body.value as { maxLifetimeSeconds: number }).maxLifetimeSeconds, 100000);
});

it("a definition cannot be named `tokens`: its destroy route would be DELETE /api/tokens/{key}, the token revocation route", () => {
  assert.throws(
    () => setup({ use: { tokens: agentOS() } }),
    (error: Error & { code?: string }) => error.code === "INVALID_ARGUMENT" && /use\.tokens: the name is reserved/.test(error.message),
  );
  // Other names are unaffected, including ones that merely start with it.
  assert.doesNotThrow(() => setup({ use: { tokensVm: agentOS() } }));
});
