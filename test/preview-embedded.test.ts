// An embedded VM (createVm, no registry) serves its own preview URLs with the
// same gateway, and only its own tokens.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { tempDataDir, testVm } from "./helpers.ts";

const APP = `require("http").createServer((req, res) => res.end("embedded " + req.headers.host + " " + req.url)).listen(3000);`;

describe("servePreviews on an embedded VM", () => {
  it("serves the VM's preview URLs, refuses other VMs' tokens, and stops with the VM", async () => {
    const dataDir = await tempDataDir();
    const vm = await testVm(dataDir, { name: "embedded-a" });
    const other = await testVm(dataDir, { name: "embedded-b" });
    await vm.writeFile("app.js", APP);
    await vm.spawn("node", ["app.js"]);
    const preview = await vm.createSignedPreviewUrl(3000, 60);
    const foreign = await other.createSignedPreviewUrl(3000, 60);
    const server = await vm.servePreviews();

    const response = await fetch(`${server.url}${preview.path}x?y=1`);
    assert.equal(response.status, 200);
    assert.equal(await response.text(), "embedded localhost:3000 /x?y=1");
    assert.equal(response.headers.get("access-control-allow-origin"), "*");

    const refused = await fetch(`${server.url}${foreign.path}`);
    assert.equal(refused.status, 403, "a token of another VM in the same data directory is not served here");
    assert.equal((await fetch(`${server.url}/elsewhere`)).status, 404);

    await vm.expireSignedPreviewUrl(preview.token);
    assert.equal((await fetch(`${server.url}${preview.path}`)).status, 403, "revocation takes effect at once");

    await vm.dispose();
    await assert.rejects(fetch(`${server.url}${preview.path}`), "the preview server stops with the VM");
    await other.dispose();
  });

  it("rejects bad options with INVALID_ARGUMENT", async () => {
    const vm = await testVm(await tempDataDir(), { name: "embedded-c" });
    await assert.rejects(vm.servePreviews({ port: 70000 }), { code: "INVALID_ARGUMENT" });
    await assert.rejects(vm.servePreviews({ nope: 1 } as never), { code: "INVALID_ARGUMENT" });
    await vm.dispose();
  });
});
