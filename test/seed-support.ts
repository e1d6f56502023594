/**
 * Running the seed pages' files as they are (test/server-seeds.test.ts explains
 * how): an app directory with the fixtures, and a client file run as its own
 * process. Shared by the single-node and the cluster seed runs.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdir, mkdtemp, readFile, realpath, symlink, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = fileURLToPath(new URL("..", import.meta.url));
export const NODE = join(REPO, "node_modules/.bin/node");
const SEEDS = join(REPO, "test/seeds");
export const SEED_URL = "http://localhost:6420";

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((done, fail) => server.once("error", fail).listen(0, "127.0.0.1", done));
  const { port } = server.address() as { port: number };
  await new Promise((done) => server.close(done));
  return port;
}

/**
 * A temp app directory: seed fixtures copied in (client URLs rewritten to
 * `port`, nothing else), node_modules/agentvm → the repo.
 */
export async function appDir(page: string, files: Record<string, string>, port: number, endpoint = `http://localhost:${port}`): Promise<string> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), "agentvm-seed-")));
  await mkdir(join(dir, "node_modules"));
  await symlink(REPO, join(dir, "node_modules/agentvm"), "dir");
  await writeFile(join(dir, "package.json"), JSON.stringify({ name: "seed-app", private: true, type: "module" }));
  for (const [target, fixture] of Object.entries(files)) {
    let text = await readFile(join(SEEDS, page, fixture), "utf8");
    if (target.startsWith("client")) {
      assert.ok(text.includes(SEED_URL), `${fixture} should use ${SEED_URL}`);
      text = text.split(SEED_URL).join(endpoint);
    }
    await writeFile(join(dir, target), text);
  }
  return dir;
}

export function childEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env = { ...process.env, ...extra };
  delete env.HOST;
  delete env.NODE_TEST_CONTEXT;
  return env;
}

/** Runs a client file to completion (killed after `timeoutMs`). */
export function runClient(dir: string, file: string, timeoutMs = 30_000): Promise<RunResult> {
  const child = spawn(NODE, ["--conditions=agentvm-source", file], { cwd: dir, env: childEnv({}), stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (chunk) => (stdout += chunk));
  child.stderr.on("data", (chunk) => (stderr += chunk));
  const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

export function assertRan(result: RunResult, what: string): void {
  assert.equal(result.code, 0, `${what} exited with ${result.code ?? result.signal}\nstdout: ${result.stdout}\nstderr: ${result.stderr}`);
}

