/**
 * Shared glue for the preview tests (test/preview-*.test.ts): a real agentvm
 * server started in this process on a free port with its own data directory,
 * the typed client against it, guest programs started through that client, raw
 * HTTP requests with any Host header (for subdomain previews), and headless
 * Chromium. Everything started here is closed by one `after` hook registered
 * when this module loads (so at the test file's top level), newest first.
 */
import { after } from "node:test";
import { existsSync } from "node:fs";
import { cp, mkdtemp, readFile, realpath, rm } from "node:fs/promises";
import { request, type IncomingHttpHeaders, type IncomingMessage } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { agentOS, setup, type AgentOsConfig, type Registry, type RunningServer, type StartOptions, type VmDefinition } from "agentvm";
import { createClient, type VmConnection, type VmHandle } from "agentvm/client";
import { sandboxProcessTree } from "../helpers.ts";

export const REPO = fileURLToPath(new URL("../..", import.meta.url));
export const CHROMIUM = "/usr/bin/chromium";

const cleanups: (() => unknown)[] = [];
after(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) {
    try {
      await cleanup();
    } catch (error) {
      console.error("preview test cleanup failed:", error);
    }
  }
});

/** Runs `cleanup` when the file's tests end (newest first). */
export function onCleanup(cleanup: () => unknown): void {
  cleanups.push(cleanup);
}

export async function tempDir(prefix = "agentvm-preview-"): Promise<string> {
  const dir = await realpath(await mkdtemp(join(tmpdir(), prefix)));
  onCleanup(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

export type TestRegistry = Registry<{ vm: VmDefinition }>;
export type PreviewOptions = NonNullable<StartOptions["preview"]>;

export interface PreviewServer {
  readonly registry: TestRegistry;
  readonly server: RunningServer;
  readonly dataDir: string;
  /** The API, e.g. http://localhost:40123 */
  readonly url: string;
  readonly port: number;
  /** The preview origin, e.g. http://localhost:40124 */
  readonly previewUrl: string;
  readonly previewPort: number;
  vm(key: string): VmHandle;
  /** The host directory that is the VM's `/` (keys here are safe directory names). */
  root(key: string): string;
  close(): Promise<void>;
}

/** Starts a real server (`registry.start`) with one definition named `vm`. */
export async function startPreviewServer(options: { config?: AgentOsConfig; preview?: PreviewOptions; dataDir?: string; auth?: StartOptions["auth"] } = {}): Promise<PreviewServer> {
  const dataDir = options.dataDir ?? (await tempDir());
  const registry = setup({ use: { vm: agentOS({ ...options.config }) } });
  const server = await registry.start({ port: 0, dataDir, handleSignals: false, ...(options.preview ? { preview: options.preview } : {}), ...(options.auth ? { auth: options.auth } : {}) });
  const apiKey = options.auth?.apiKeys?.find((entry): entry is string => typeof entry === "string");
  const client = createClient<TestRegistry>(apiKey ? { endpoint: server.url, token: apiKey } : server.url);
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await server.close();
  };
  onCleanup(close);
  return {
    registry,
    server,
    dataDir,
    url: server.url,
    port: server.port,
    previewUrl: server.previewUrl,
    previewPort: server.previewPort,
    vm: (key) => client.vm.getOrCreate(key),
    root: (key) => join(dataDir, "vms", key, "root"),
    close,
  };
}

/** Output of every process of one VM, gathered over the client's event stream. */
export class GuestOutput {
  readonly #connection: VmConnection;
  readonly #text = new Map<number, string>();
  readonly #exits = new Map<number, number>();

  private constructor(connection: VmConnection) {
    this.#connection = connection;
    connection.on("processOutput", (event) => this.#text.set(event.pid, (this.#text.get(event.pid) ?? "") + Buffer.from(event.data).toString("utf8")));
    connection.on("processExit", (event) => this.#exits.set(event.pid, event.exitCode));
  }

  static async open(vm: VmHandle): Promise<GuestOutput> {
    const output = new GuestOutput(vm.connect());
    await output.#connection.ready;
    onCleanup(() => output.#connection.dispose());
    return output;
  }

  of(pid: number): string {
    return this.#text.get(pid) ?? "";
  }

  exitCode(pid: number): number | undefined {
    return this.#exits.get(pid);
  }

  dispose(): Promise<void> {
    return this.#connection.dispose();
  }
}

let scripts = 0;

/**
 * Writes a CommonJS guest program under /home/agentos, runs it with `node` and
 * waits until the VM lists `port` as listening. Fails with the program's output
 * if it exits first or the deadline passes.
 */
export async function startGuestServer(vm: VmHandle, output: GuestOutput, source: string, port: number, options: { cwd?: string; timeoutMs?: number } = {}): Promise<number> {
  const file = `/home/agentos/preview-guest-${process.pid}-${++scripts}.cjs`;
  await vm.writeFile(file, source);
  return spawnListening(vm, output, [file], port, options);
}

/** Runs `node ...args` in the VM and waits until `port` is listening (see startGuestServer). */
export async function spawnListening(vm: VmHandle, output: GuestOutput, args: string[], port: number, options: { cwd?: string; timeoutMs?: number } = {}): Promise<number> {
  const { pid } = await vm.spawn("node", args, options.cwd ? { cwd: options.cwd } : {});
  const what = `node ${args.join(" ")}`;
  await waitFor(
    async () => {
      const exit = output.exitCode(pid);
      if (exit !== undefined) throw new Error(`${what} exited with ${exit} before listening on ${port}; output: ${output.of(pid)}`);
      return (await vm.listeningPorts()).includes(port);
    },
    () => `${what} to listen on ${port} (output: ${JSON.stringify(output.of(pid).slice(-800))})`,
    options.timeoutMs ?? 20_000,
  );
  return pid;
}

/** Polls `check` until it returns a truthy value or the deadline passes. */
export async function waitFor<T>(check: () => T | Promise<T>, what: string | (() => string), timeoutMs = 10_000, intervalMs = 25): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${typeof what === "function" ? what() : what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/**
 * Copies packages (and their dependencies) from the repo's node_modules into a
 * node_modules directory inside the VM. `aliases` installs a package under
 * another name (e.g. esbuild → esbuild-wasm).
 */
export async function installIntoVm(root: string, guestDir: string, names: string[], aliases: Record<string, string> = {}): Promise<string[]> {
  const seen = new Set<string>();
  const visit = async (name: string): Promise<void> => {
    if (seen.has(name)) return;
    seen.add(name);
    const source = join(REPO, "node_modules", aliases[name] ?? name);
    const manifest = JSON.parse(await readFile(join(source, "package.json"), "utf8")) as { dependencies?: Record<string, string> };
    await cp(source, join(root, guestDir, "node_modules", name), { recursive: true });
    for (const dependency of Object.keys(manifest.dependencies ?? {})) {
      if (!dependency.startsWith("@types/")) await visit(dependency);
    }
  };
  for (const name of names) await visit(name);
  return [...seen];
}

export interface RawResponse {
  status: number;
  headers: IncomingHttpHeaders;
  /** Header names and values as sent, to count duplicates. */
  rawHeaders: string[];
  body: Buffer;
  text: string;
}

export interface RawRequestOptions {
  method?: string;
  path: string;
  headers?: Record<string, string | string[]>;
  body?: string | Buffer;
}

/**
 * One HTTP/1.1 request to 127.0.0.1:port with exactly the given headers (Host
 * included, which fetch does not let a caller set), on its own connection.
 */
export function rawRequest(port: number, options: RawRequestOptions): Promise<RawResponse> {
  const headers = { ...options.headers };
  // Node's client sends a DELETE or OPTIONS body without a length unless told one.
  if (options.body !== undefined && !Object.keys(headers).some((name) => name.toLowerCase() === "content-length")) headers["content-length"] = String(Buffer.byteLength(options.body));
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, method: options.method ?? "GET", path: options.path, headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.once("error", reject);
      res.once("end", () => {
        const body = Buffer.concat(chunks);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, rawHeaders: res.rawHeaders, body, text: body.toString("utf8") });
      });
    });
    req.once("error", reject);
    req.end(options.body);
  });
}

/** How many times a header (any case) appears in a response. */
export function headerCount(response: { rawHeaders: string[] }, name: string): number {
  return response.rawHeaders.filter((value, index) => index % 2 === 0 && value.toLowerCase() === name).length;
}

/** Resolves with the response head of a request still in progress. */
export function responseOf(req: ReturnType<typeof request>): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    req.once("response", resolve);
    req.once("error", reject);
  });
}

export const FORBIDDEN_BODY = "Forbidden: this preview link is invalid, expired or revoked.\n";

export const chromiumInstalled = existsSync(CHROMIUM);

/** Skip reason for browser tests on a machine without Chromium (CI installs it, and there it is never skipped). */
export const browserSkip = chromiumInstalled || process.env.CI ? false : `${CHROMIUM} is not installed (apt-get install -y chromium)`;

export const CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"];

/** Headless Chromium through playwright-core, closed when the file's tests end. */
export async function launchChromium(): Promise<import("playwright-core").Browser> {
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 30_000 });
  onCleanup(() => browser.close());
  return browser;
}

/** Host pids of the sandbox of the VM whose directory is `root`: bubblewrap and every process in it. */
export async function sandboxPids(root: string): Promise<number[]> {
  return sandboxProcessTree(root);
}

/** A page in a fresh browser context (closed when the test file's work is cleaned up), with a 20 s default timeout. */
export async function newPage(browser: import("playwright-core").Browser): Promise<import("playwright-core").Page> {
  const context = await browser.newContext();
  onCleanup(() => context.close());
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  return page;
}
