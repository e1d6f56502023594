// A machine without bubblewrap or with the wrong guest Node gets an error that
// says what is missing and how to get it — never a guest running unconfined.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { promisify } from "node:util";

const run = promisify(execFile);
const node = join(import.meta.dirname, "..", "node_modules", ".bin", "node");
const dirs: string[] = [];
after(() => Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true }))));

/** createVm in a fresh process (the prerequisite checks are cached per process), returning its error. */
async function createVmError(env: Record<string, string>): Promise<{ code: string; message: string }> {
  const dataDir = await mkdtemp(join(tmpdir(), "agentvm-prereq-"));
  dirs.push(dataDir);
  const script = `
    import { createVm } from "agentvm";
    try { const vm = await createVm({ dataDir: ${JSON.stringify(dataDir)} }); await vm.dispose(); console.log(JSON.stringify({ code: "none" })); }
    catch (error) { console.log(JSON.stringify({ code: error.code, message: error.message })); }`;
  const { stdout } = await run(node, ["--conditions=agentvm-source", "--input-type=module", "-e", script], {
    cwd: join(import.meta.dirname, ".."),
    env: { ...process.env, ...env },
  });
  return JSON.parse(stdout.trim()) as { code: string; message: string };
}

describe("sandbox prerequisites", () => {
  it("without bubblewrap: SANDBOX_UNAVAILABLE, saying how to install it", async () => {
    const error = await createVmError({ AGENTVM_BWRAP: "/nonexistent/bwrap" });
    assert.equal(error.code, "SANDBOX_UNAVAILABLE");
    assert.match(error.message, /apt-get install bubblewrap/);
  });

  it("a guest Node that does not exist: GUEST_RUNTIME_MISSING naming the path", async () => {
    const error = await createVmError({ AGENTVM_GUEST_NODE: "/nonexistent/node" });
    assert.equal(error.code, "GUEST_RUNTIME_MISSING");
    assert.match(error.message, /\/nonexistent\/node/);
  });

  it("a guest Node older than 26: GUEST_RUNTIME_MISSING", async (t) => {
    const { stdout } = await run("sh", ["-c", "command -v node || true"], { env: { PATH: "/usr/local/bin:/usr/bin:/bin" } });
    const systemNode = stdout.trim();
    const version = systemNode ? (await run(systemNode, ["--version"])).stdout.trim() : "";
    if (!/^v(1\d|2[0-5])\./.test(version)) return t.skip("no Node older than 26 on this machine to try");
    const error = await createVmError({ AGENTVM_GUEST_NODE: systemNode });
    assert.equal(error.code, "GUEST_RUNTIME_MISSING");
    assert.match(error.message, /Node ≥ 26/);
  });
});
