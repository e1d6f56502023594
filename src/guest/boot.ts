/**
 * Entry point of a pre-started (pooled) guest. The sandbox and Node start before
 * anyone asks for a process; this file loads the preload, tells the kernel it is
 * ready, and waits for the program to run. The kernel then sends the argv,
 * environment, working directory and VM pid, and the program starts as if
 * `node script.js args…` had been typed — `require.main`, `process.argv` and
 * relative imports behave the same.
 */
import Module from "node:module";
import { resolve } from "node:path";
import { kernel } from "./preload.ts";

interface RunEvent {
  argv: string[];
  env: Record<string, string>;
  cwd: string;
  pid: number;
  ppid: number;
}

kernel.ref();
kernel.onEvent("run", (raw) => {
  const run = raw as unknown as RunEvent;
  const [script, ...args] = run.argv;
  process.argv = [process.execPath, resolve(run.cwd, script!), ...args];
  for (const key of Object.keys(process.env)) delete process.env[key];
  Object.assign(process.env, run.env);
  process.chdir(run.cwd);
  Object.defineProperty(process, "pid", { value: run.pid, enumerable: true, configurable: true });
  Object.defineProperty(process, "ppid", { value: run.ppid, enumerable: true, configurable: true });
  kernel.unref();
  (Module as unknown as { runMain(): void }).runMain();
});
kernel.emitEvent({ type: "ready" });
