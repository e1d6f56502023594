/**
 * Type test for the client: only type-checked (`npm run typecheck`, and
 * test/server-types.test.ts), never run. Each `@ts-expect-error` must stay an
 * error — tsc reports an unused directive — and server-types.test.ts checks that
 * each one suppresses exactly one error, on the line below it.
 *
 * Imports use the package names a user would (`agentvm`, `agentvm/client`).
 */
import { agentOS, agentOs, setup, type MintedToken, type ProcessInfo, type TokenRequest, type VmStat } from "agentvm";
import { AgentVmError, createClient, type DestroyResult, type ErrorCode, type TarExtractResult, type TransferProgress, type VmConnection, type VmHandle, type VmSummary, type VmWatch, type WatchEvent } from "agentvm/client";

const registry = setup({ use: { vm: agentOS({ software: [] }), other: agentOs({ options: { software: [] } }) } });

const client = createClient<typeof registry>({ endpoint: "http://localhost:6420" });
const fromUrl = createClient<typeof registry>("http://localhost:6420");
const h: VmHandle = client.vm.getOrCreate("my-agent");
const fromArray: VmHandle = fromUrl.vm.getOrCreate(["my-agent"]);
const other: VmHandle = client.other.getOrCreate("k");

export async function correctlyTyped(): Promise<void> {
  // Files.
  const bytes: Uint8Array = await h.readFile("x");
  const written: void = await h.writeFile("x", "text");
  await h.writeFile("x", new Uint8Array([1, 2, 3]));
  await h.mkdir("/d", { recursive: true });
  const names: string[] = await h.readdir("/");
  const stat: VmStat = await h.stat("/x");
  const size: number = stat.size;
  const isFile: boolean = stat.isFile;
  const exists: boolean = await fromArray.exists("/x");
  await h.deleteFile("/x");
  await h.remove("/d", { recursive: true });
  await other.move("/a", "/b");

  // Processes.
  const { pid }: { pid: number } = await h.spawn("node", ["server.js"], { cwd: "/home/agentos", env: { PORT: "3000" } });
  const result = await h.exec("node", ["-e", "1"]);
  const exitCode: number = result.exitCode;
  const stdout: string = result.stdout;
  const waited: number = await h.waitProcess(pid);
  await h.killProcess(pid);
  await h.killProcess(pid, "SIGKILL");
  await h.writeProcessStdin(pid, "line\n");
  await h.writeProcessStdin(pid, new Uint8Array([10]));
  await h.closeProcessStdin(pid);
  // A synchronous Vm method is a promise on the client.
  const listing: Promise<ProcessInfo[]> = h.listProcesses();
  const processes: ProcessInfo[] = await listing;
  const running: boolean | undefined = processes[0]?.running;
  const ports: number[] = await h.listeningPorts();

  // Network.
  const response = await h.vmFetch(3000, "/", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key: "value" }) });
  const status: number = response.status;
  const statusText: string = response.statusText;
  const headers: Record<string, string> = response.headers;
  const body: Uint8Array = response.body;
  await h.vmFetch(3000, "/bytes", { body: new Uint8Array(4) });
  const streamed = await h.vmFetchStream(3000, "/big");
  const stream: ReadableStream<Uint8Array> = streamed.body;

  // Previews (seed API).
  const preview = await h.createSignedPreviewUrl(3000);
  const short = await h.createSignedPreviewUrl(3000, 300);
  const path: string = preview.path;
  const previewUrl: string = preview.url;
  const server = await registry.start({ port: 0, preview: { port: 0, listenHost: "127.0.0.1" } });
  const previewOrigin: string = server.previewUrl;
  const previewPort: number = server.previewPort;
  const token: string = short.token;
  const expiresAt: number = preview.expiresAt;
  await h.expireSignedPreviewUrl(preview.token);

  // Events.
  const connection: VmConnection = h.connect();
  await connection.ready;
  connection.on("processOutput", (event) => {
    const data: Uint8Array = event.data;
    const stream: "stdout" | "stderr" = event.stream;
    const from: number = event.pid;
    void [data, stream, from];
  });
  const unsubscribe: () => void = connection.on("processExit", (event) => {
    const code: number = event.exitCode;
    void code;
  });
  unsubscribe();
  await connection.dispose();

  // Errors.
  try {
    await h.readFile("missing");
  } catch (error) {
    if (error instanceof AgentVmError) {
      const code: ErrorCode = error.code;
      void code;
    }
  }

  void [bytes, written, names, size, isFile, exists, exitCode, stdout, waited, running, ports, status, statusText, headers, body, stream, path, token, expiresAt];
}

/** Streamed files, tar and watches. */
export async function fileTransfers(stream: ReadableStream<Uint8Array>, chunks: AsyncIterable<Uint8Array>): Promise<void> {
  await h.writeFile("/home/agentos/run.sh", "#!/bin/sh\n", { mode: 0o755 });
  await h.writeFile("/home/agentos/log.txt", "line\n", { append: true });
  const uploaded: { path: string; size: number } = await h.upload("/home/agentos/big.bin", stream, { mode: 0o600, onProgress: (p: TransferProgress) => void p.bytes });
  await h.upload("a.bin", chunks, { append: true });
  await h.upload("b.bin", new Uint8Array(4));
  await h.upload("c.txt", new Blob(["text"]));
  const downloaded: ReadableStream<Uint8Array> = await h.download("/home/agentos/big.bin", { start: 0, end: 99, onProgress: ({ bytes, total }) => void [bytes, total] });
  const archive: ReadableStream<Uint8Array> = await h.downloadTar("/home/agentos");
  const extracted: TarExtractResult = await h.uploadTar("/home/agentos/copy", archive);
  const files: number = extracted.files;
  const watch: VmWatch = await h.watch("/home/agentos", { recursive: true, onEvent: (event: WatchEvent) => void event.path });
  for await (const event of watch) {
    const type: "create" | "modify" | "delete" | "rename" | "overflow" = event.type;
    const oldPath: string | undefined = event.oldPath;
    void [type, oldPath];
  }
  await watch.close();
  await watch.closed;
  void [uploaded, downloaded, files];
}

export async function fileTransfersWronglyTyped(): Promise<void> {
  // @ts-expect-error a mode is a number (0o755), not a string
  await h.upload("x", "x", { mode: "755" });
  // @ts-expect-error writeFile takes mode and append only
  await h.writeFile("x", "x", { truncate: true });
  // @ts-expect-error download returns a stream, not bytes
  const bytes: Uint8Array = await h.download("x");
  // @ts-expect-error recursive is a boolean
  await h.watch("/home/agentos", { recursive: "yes" });
  void bytes;
}

/** Credentials: the client's token, and tokens minted by the registry. */
export async function credentials(): Promise<void> {
  const scoped = createClient<typeof registry>({ endpoint: "http://localhost:6420", token: "avt_…" });
  const handle: VmHandle = scoped.vm.getOrCreate("k");
  const minted: MintedToken = await registry.createToken({ key: "k", actions: ["readFile", "vmFetch"], expiresInSeconds: 60 });
  const tokenText: string = minted.token;
  const until: number = minted.expiresAt;
  const everything: TokenRequest = { definition: "other", key: ["k"], actions: "*" };
  void [handle, tokenText, until, everything];
}

/** Lifecycle: listing a definition's VMs and destroying one (with its key as confirmation). */
export async function lifecycle(): Promise<void> {
  const vms: VmSummary[] = await client.vm.list();
  const page = await client.other.list({ after: "k", limit: 10 });
  const key: string = page[0]!.key;
  const awake: boolean = vms[0]!.awake;
  const lastActiveAt: number = vms[0]!.lastActiveAt;
  const destroyed: DestroyResult = await h.destroy({ confirm: "my-agent" });
  const existed: boolean = destroyed.existed;
  await fromArray.destroy({ confirm: ["my-agent"] });
  const server = await registry.start();
  const listed: VmSummary[] = server.listVms("vm", { limit: 5 });
  const gone: DestroyResult = await server.destroyVm("vm", "my-agent");
  void [key, awake, lastActiveAt, existed, listed, gone];
}

/** The seed client code (RivetKit page, vmFetch sections) type-checks as written. */
export async function seedClient(): Promise<void> {
  const client = createClient<typeof registry>("http://localhost:6420");
  const agent = client.vm.getOrCreate(["my-agent"]);
  await agent.writeFile("/home/user/server.js", 'require("http").createServer((req, res) => res.end("Hello from VM")).listen(3000);');
  await agent.spawn("node", ["/home/user/server.js"]);
  const response = await agent.vmFetch(3000, "/");
  console.log("Status:", response.status);
  console.log("Body:", new TextDecoder().decode(response.body));
  const posted = await agent.vmFetch(3000, "/api/data", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ key: "value" }),
  });
  console.log("Status:", posted.status, posted.statusText);
  console.log("Headers:", posted.headers);
}

export async function wronglyTyped(): Promise<void> {
  // @ts-expect-error a token is a string
  createClient<typeof registry>({ endpoint: "http://localhost:6420", token: 42 });
  // @ts-expect-error token actions are action names or "*"
  await registry.createToken({ key: "k", actions: ["formatDisk"] });
  // @ts-expect-error a path is a string
  await h.writeFile(123, "x");
  // @ts-expect-error content is a string or bytes
  await h.writeFile("x", 42);
  // @ts-expect-error a port is a number
  await h.vmFetch("3000", "/");
  // @ts-expect-error a path is a string
  await h.vmFetch(3000, 5);
  // @ts-expect-error args is an array of strings
  await h.spawn("node", "notAnArray");
  // @ts-expect-error env values are strings
  await h.spawn("node", [], { env: { PORT: 3000 } });
  // @ts-expect-error a key is a string or an array of strings
  client.vm.getOrCreate(42);
  // @ts-expect-error no such action
  await h.formatDisk();
  // @ts-expect-error destroy needs its confirmation
  await h.destroy();
  // @ts-expect-error the confirmation is the key, not a boolean
  await h.destroy({ confirm: true });
  // @ts-expect-error list pages by key
  await client.vm.list({ after: 3 });
  // @ts-expect-error no such definition in the registry
  client.nope.getOrCreate("k");
  // @ts-expect-error readFile resolves to bytes, not a string
  const asText: string = await h.readFile("x");
  // @ts-expect-error listProcesses returns a promise on the client
  const sync: ProcessInfo[] = h.listProcesses();
  // @ts-expect-error a pid is a number
  await h.waitProcess("1");
  // @ts-expect-error no such event
  h.connect().on("processOops", () => {});
  // @ts-expect-error a ttl is a number of seconds
  await h.createSignedPreviewUrl(3000, "5m");
  // @ts-expect-error the client needs an endpoint
  createClient<typeof registry>({ url: "http://localhost:6420" });
  // @ts-expect-error unknown config keys are type errors too
  agentOS({ nope: 1 });
  void [asText, sync];
}
