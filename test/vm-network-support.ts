/**
 * Helpers shared by the network end-to-end tests (vm-network*.test.ts,
 * vm-fetch*.test.ts): write a guest program, run it, read what it printed.
 * Guests report structured results on one line: `RESULT <json>`.
 */
import { cp, readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Vm } from "agentvm";
import { collectOutput, waitForOutput } from "./helpers.ts";

export const REPO = join(dirname(fileURLToPath(import.meta.url)), "..");

let scripts = 0;

/** Writes `source` to a fresh file in /home/agentos and returns its name (relative to home). */
export async function writeScript(vm: Vm, source: string, ext = "cjs"): Promise<string> {
  const name = `net-test-${process.pid}-${++scripts}.${ext}`;
  await vm.writeFile(`/home/agentos/${name}`, source);
  return name;
}

export interface Started {
  pid: number;
  /** The first capture group of `ready` (e.g. a port the guest printed). */
  ready: string | undefined;
  output: ReturnType<typeof collectOutput>;
}

/** Starts a long-running guest and waits until its output matches `ready`. */
export async function startGuest(vm: Vm, source: string, ready: RegExp, args: string[] = []): Promise<Started> {
  const script = await writeScript(vm, source);
  const { pid } = await vm.spawn("node", [script, ...args]);
  const output = collectOutput(vm, pid);
  const match = await waitForOutput(vm, pid, ready, 15_000);
  return { pid, ready: match[1], output };
}

export interface GuestRun {
  exitCode: number;
  stdout: string;
  stderr: string;
  /** The JSON after the last `RESULT ` line, if any. */
  result: any;
}

/** Runs a guest program to completion and returns what it printed. */
export async function runGuest(vm: Vm, source: string, args: string[] = []): Promise<GuestRun> {
  const script = await writeScript(vm, source);
  const { pid } = await vm.spawn("node", [script, ...args]);
  const output = collectOutput(vm, pid);
  const exitCode = await vm.waitProcess(pid);
  output.stop();
  const line = output.stdout
    .split("\n")
    .reverse()
    .find((l) => l.startsWith("RESULT "));
  const result = line === undefined ? undefined : JSON.parse(line.slice("RESULT ".length));
  return { exitCode, stdout: output.stdout, stderr: output.stderr, result };
}

/** Like runGuest, but fails with the guest's output unless it printed a RESULT line. */
export async function guestResult(vm: Vm, source: string, args: string[] = []): Promise<any> {
  const run = await runGuest(vm, source, args);
  if (run.result === undefined) {
    throw new Error(`guest exited with ${run.exitCode} without a RESULT line\nstdout: ${run.stdout}\nstderr: ${run.stderr}`);
  }
  return run.result;
}

/** Copies a package and everything it depends on from the repo's node_modules into the VM's. */
export async function installPackage(vm: Vm, name: string): Promise<string[]> {
  const seen = new Set<string>();
  const visit = async (pkg: string): Promise<void> => {
    if (seen.has(pkg)) return;
    seen.add(pkg);
    const manifest = JSON.parse(await readFile(join(REPO, "node_modules", pkg, "package.json"), "utf8")) as {
      dependencies?: Record<string, string>;
    };
    await cp(join(REPO, "node_modules", pkg), join(vm.root, "home/agentos/node_modules", pkg), { recursive: true });
    for (const dep of Object.keys(manifest.dependencies ?? {})) await visit(dep);
  };
  await visit(name);
  return [...seen];
}
