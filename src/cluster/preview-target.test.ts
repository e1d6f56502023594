// Where a preview's owning node is reached, without an engine: the advertised
// address (https, default ports, IPv6) and what a directory failure means.
import assert from "node:assert/strict";
import { test } from "node:test";
import { httpStatus } from "../server/http-api.ts";
import { locateOwner, previewTarget } from "./preview-target.ts";

test("an advertised preview origin without a port uses the scheme's default, and https means TLS", () => {
  assert.deepEqual(previewTarget("b", "https://preview.example.com"), { tls: true, host: "preview.example.com", port: 443, origin: "https://preview.example.com" });
  assert.deepEqual(previewTarget("b", "http://preview.example.com"), { tls: false, host: "preview.example.com", port: 80, origin: "http://preview.example.com" });
  assert.deepEqual(previewTarget("b", "https://preview.example.com:8443"), { tls: true, host: "preview.example.com", port: 8443, origin: "https://preview.example.com:8443" });
  assert.deepEqual(previewTarget("b", "http://10.0.0.11:6441"), { tls: false, host: "10.0.0.11", port: 6441, origin: "http://10.0.0.11:6441" });
  assert.equal(previewTarget("b", "http://[fd00::11]:6441").host, "fd00::11", "IPv6 without brackets, as net.connect takes it");
  // Written with the default port, the URL drops it: still the default.
  assert.equal(previewTarget("b", "https://preview.example.com:443").port, 443);
});

test("an advertised address that is not an http(s) origin is PREVIEW_NODE_UNAVAILABLE naming the node", () => {
  for (const bad of ["not a url", "ftp://preview.example.com", "file:///etc/passwd"]) {
    assert.throws(() => previewTarget("node-b", bad), (error: Error & { code?: string }) => error.code === "PREVIEW_NODE_UNAVAILABLE" && /node-b/.test(error.message), bad);
  }
});

test("a directory that fails is unavailable (503), not an unknown node (403); an unlisted node is unknown", async () => {
  const failed = await locateOwner("b", async () => {
    throw new Error("fetch failed");
  });
  assert.equal(failed.kind, "unavailable");
  assert.equal(failed.kind === "unavailable" && failed.error.code, "PREVIEW_NODE_UNAVAILABLE");
  assert.equal(httpStatus("PREVIEW_NODE_UNAVAILABLE"), 503);
  assert.match(failed.kind === "unavailable" ? failed.error.message : "", /node b.*fetch failed/);
  assert.deepEqual(await locateOwner("b", async () => undefined), { kind: "unknown" });
  const found = await locateOwner("b", async () => ({ previewUrl: "https://preview.example.com" }));
  assert.deepEqual(found, { kind: "found", target: { tls: true, host: "preview.example.com", port: 443, origin: "https://preview.example.com" } });
  const garbled = await locateOwner("b", async () => ({ previewUrl: "gopher://x" }));
  assert.equal(garbled.kind, "unavailable");
});
