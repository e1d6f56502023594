/**
 * Cluster processes for tests and benchmarks: `agentvm` commands run as child
 * processes (ready when their output says so, stopped by pid), and free port
 * ranges for them.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { join } from "node:path";
import { waitFor } from "./helpers.ts";
import { childEnv, NODE, REPO } from "./seed-support.ts";

const CLI = join(REPO, "src/cli/agentvm.ts");

/** A port whose next `count - 1` ports are free too (the engine takes three). */
export async function freePorts(count: number): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20_000 + Math.floor(Math.random() * 30_000);
    const servers = [];
    try {
      for (let offset = 0; offset < count; offset++) {
        const server = createServer();
        await new Promise<void>((done, fail) => server.once("error", fail).listen(base + offset, "127.0.0.1", done));
        servers.push(server);
      }
      return base;
    } catch {
      // taken: try another
    } finally {
      await Promise.all(servers.map((server) => new Promise((done) => server.close(done))));
    }
  }
  throw new Error("no free port range");
}

/** One `agentvm` command as a child process; ready once its output says so. */
export class AgentvmCommand {
  readonly child: ChildProcess;
  output = "";
  readonly exited: Promise<void>;

  constructor(args: string[], env: Record<string, string> = {}) {
    this.child = spawn(NODE, ["--conditions=agentvm-source", CLI, ...args], { env: childEnv(env), stdio: ["ignore", "pipe", "pipe"] });
    this.child.stdout!.on("data", (chunk) => (this.output += chunk));
    this.child.stderr!.on("data", (chunk) => (this.output += chunk));
    this.exited = new Promise((done) => this.child.once("exit", () => done()));
  }

  async ready(pattern: RegExp, timeoutMs = 30_000): Promise<void> {
    await waitFor(() => {
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`agentvm exited early:\n${this.output}`);
      return pattern.test(this.output);
    }, `agentvm to print ${pattern}\n${this.output}`, timeoutMs, 50);
  }

  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
    await this.exited;
    clearTimeout(timer);
  }
}

