/**
 * limits.trustedProxies: behind a reverse proxy, limits.maxConnectionsPerClient
 * counts per client that the proxy names in X-Forwarded-For, not for the proxy
 * as one client; from any other address the header is ignored.
 */
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import { after, before, describe, it } from "node:test";
import { agentOS, setup, type RunningServer } from "agentvm";
import { parseServerLimits } from "../src/server/server-limits.ts";
import { tempDataDir } from "./helpers.ts";

const MAX_CONNECTIONS = 4;
/** Each test connects from a loopback address of its own, so their connections do not mix. */
const PROXY = "127.0.0.3";
const registry = setup({ use: { vm: agentOS() } });
let server: RunningServer;
const held: Socket[] = [];

before(async () => {
  server = await registry.start({
    port: 0,
    host: "127.0.0.1",
    dataDir: await tempDataDir("agentvm-trusted-proxy-"),
    handleSignals: false,
    limits: { maxConnectionsPerClient: MAX_CONNECTIONS, trustedProxies: [PROXY, "127.0.0.16/30"] },
  });
});
after(async () => {
  for (const socket of held) socket.destroy();
  await server?.close();
});

/** Opens a connection from `from`, sends one keep-alive request, and returns the status line; the connection stays open. */
async function request(from: string, forwardedFor?: string): Promise<string> {
  const socket = connect({ port: Number(new URL(server.url).port), host: "127.0.0.1", localAddress: from });
  held.push(socket);
  await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
  socket.write(`GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n${forwardedFor === undefined ? "" : `x-forwarded-for: ${forwardedFor}\r\n`}\r\n`);
  // Read with a listener: leaving a for-await loop would destroy the socket, and it must stay open.
  return new Promise((resolve, reject) => {
    let text = "";
    const onData = (chunk: Buffer) => {
      text += String(chunk);
      if (!text.includes("\r\n\r\n")) return;
      socket.off("data", onData);
      resolve(text);
    };
    socket.on("data", onData);
    socket.once("close", () => resolve(text));
    socket.once("error", reject);
  });
}

describe("behind a trusted proxy", () => {
  it("each client the proxy names gets its own limit: more connections in all than one client may hold", async () => {
    for (let i = 0; i < MAX_CONNECTIONS * 3; i++) {
      assert.match(await request(PROXY, `203.0.113.${i}`), /^HTTP\/1\.1 200 /, `client ${i}`);
    }
  });

  it("one client past its limit through the proxy is answered TOO_MANY_CONNECTIONS naming it; others are not", async () => {
    for (let i = 0; i < MAX_CONNECTIONS; i++) assert.match(await request(PROXY, "198.51.100.7"), /^HTTP\/1\.1 200 /);
    const refused = await request(PROXY, "198.51.100.7");
    assert.match(refused, /^HTTP\/1\.1 429 /);
    assert.match(refused, /TOO_MANY_CONNECTIONS/);
    // The client is the rightmost address no trusted proxy holds: a chain through a second trusted proxy counts the same.
    assert.match(await request(PROXY, `198.51.100.7, 127.0.0.17`), /^HTTP\/1\.1 429 /);
    assert.match(await request(PROXY, "198.51.100.8"), /^HTTP\/1\.1 200 /);
  });

  it("from an address that is not a trusted proxy the header is ignored: the connection counts for that address", async () => {
    const direct = "127.0.0.4";
    for (let i = 0; i < MAX_CONNECTIONS; i++) assert.match(await request(direct, `192.0.2.${i}`), /^HTTP\/1\.1 200 /);
    const refused = await request(direct, "192.0.2.200");
    assert.match(refused, /^HTTP\/1\.1 429 /);
    assert.match(refused, /127\.0\.0\.4 already has/);
  });

  it("a trusted proxy's own requests without the header count for the proxy", async () => {
    const bare = "127.0.0.18";
    for (let i = 0; i < MAX_CONNECTIONS; i++) assert.match(await request(bare), /^HTTP\/1\.1 200 /);
    assert.match(await request(bare), /^HTTP\/1\.1 429 /);
  });
});

describe("limits.trustedProxies is parsed with the other limits", () => {
  it("refuses what is not an address or a CIDR, naming where it came from", async () => {
    for (const bad of [["proxy.example"], ["10.0.0.0/33"], "10.0.0.5", [5]]) {
      await assert.rejects(
        // A registry of its own: start() on a started one answers that server.
        setup({ use: { vm: agentOS() } }).start({ port: 0, dataDir: await tempDataDir("agentvm-trusted-proxy-bad-"), handleSignals: false, limits: { trustedProxies: bad as string[] } }),
        (error: Error & { code?: string }) => error.code === "INVALID_ARGUMENT" && /limits\.trustedProxies/.test(error.message),
        JSON.stringify(bad),
      );
    }
  });

  it("reads AGENTVM_TRUSTED_PROXIES (comma-separated) when the option is not given; none by default", () => {
    assert.deepEqual(parseServerLimits(undefined, {}).trustedProxies, []);
    assert.deepEqual(parseServerLimits(undefined, { AGENTVM_TRUSTED_PROXIES: "10.0.0.5, 10.0.1.0/24,::1" }).trustedProxies, ["10.0.0.5", "10.0.1.0/24", "::1"]);
    assert.deepEqual(parseServerLimits({ trustedProxies: ["10.0.0.6"] }, { AGENTVM_TRUSTED_PROXIES: "10.0.0.5" }).trustedProxies, ["10.0.0.6"], "the option wins");
    assert.throws(() => parseServerLimits(undefined, { AGENTVM_TRUSTED_PROXIES: "10.0.0.5,proxy" }), /AGENTVM_TRUSTED_PROXIES: "proxy" is not an IP address/);
  });
});
