/**
 * Cluster processes for tests and benchmarks: `agentvm` commands run as child
 * processes (ready when their output says so, stopped by pid), and free port
 * ranges for them.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { connect, createServer } from "node:net";
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


/**
 * A program the HA engine runs on (PostgreSQL, NATS, nginx), started for a
 * test as a child process: output kept, ready once it prints a pattern, stopped
 * by pid. `user` runs it as another host user (PostgreSQL refuses root).
 */
export class Daemon {
  readonly name: string;
  readonly child: ChildProcess;
  output = "";
  readonly exited: Promise<void>;

  constructor(name: string, command: string, args: string[], options: { user?: { uid: number; gid: number }; cwd?: string } = {}) {
    this.name = name;
    this.child = spawn(command, args, { stdio: ["ignore", "pipe", "pipe"], cwd: options.cwd, ...(options.user ?? {}) });
    const keep = (chunk: Buffer) => {
      this.output += chunk;
      if (this.output.length > 200_000) this.output = this.output.slice(-100_000);
    };
    this.child.stdout!.on("data", keep);
    this.child.stderr!.on("data", keep);
    this.exited = new Promise((done) => this.child.once("exit", () => done()));
  }

  async ready(check: RegExp | (() => Promise<boolean>), timeoutMs = 20_000): Promise<void> {
    await waitFor(async () => {
      if (this.child.exitCode !== null || this.child.signalCode !== null) throw new Error(`${this.name} exited early:\n${this.output}`);
      return check instanceof RegExp ? check.test(this.output) : await check();
    }, `${this.name} to be ready\n${this.output.slice(-2000)}`, timeoutMs, 50);
  }

  /** Stops it with `signal` (PostgreSQL: SIGINT is its fast shutdown), SIGKILL after 10 s. */
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
    await this.exited;
    clearTimeout(timer);
  }
}

/** True once something accepts TCP connections on 127.0.0.1:port. */
export function listening(port: number): Promise<boolean> {
  return new Promise((done) => {
    const socket = connect({ host: "127.0.0.1", port, timeout: 1_000 });
    socket.once("connect", () => {
      socket.destroy();
      done(true);
    });
    socket.once("timeout", () => {
      socket.destroy();
      done(false);
    });
    socket.once("error", () => done(false));
  });
}

/** What a client meets while an engine is gone or restarting and a node's runner reconnects. */
const TRANSIENT = new Set(["SERVER_UNREACHABLE", "VM_NODE_UNAVAILABLE", "ECONNRESET", "ECONNREFUSED", "ETIMEDOUT", "FETCH_FAILED"]);

/** Calls until it answers, retrying those transient failures (any other error fails at once); bounded by `timeoutMs`. */
export async function untilAnswered<T>(what: string, call: () => Promise<T>, timeoutMs = 60_000): Promise<T> {
  const seen = new Set<string>();
  const value = await waitFor(async () => {
    try {
      return { value: await call() };
    } catch (error) {
      const code = (error as { code?: string }).code ?? "";
      if (!TRANSIENT.has(code)) throw error;
      seen.add(code);
      return undefined;
    }
  }, what, timeoutMs, 200);
  if (seen.size > 0) console.log(`# ${what}: retried after ${[...seen].join(", ")}`);
  return value.value;
}
