/**
 * Streamed file routes (docs/http-api.md, "Files as streams"):
 *
 *   GET|HEAD /api/:definition/:key/files/<path>   download a file (Range: bytes=… answered with 206)
 *   PUT      /api/:definition/:key/files/<path>   upload a file (?mode=644, ?append=1)
 *   GET      /api/:definition/:key/tar/<dir>      a directory as a tar stream
 *   PUT      /api/:definition/:key/tar/<dir>      extract a tar stream into a directory
 *   GET      /api/:definition/:key/watch/<path>   watch events as Server-Sent Events (?recursive=1)
 *
 * Bodies are never buffered: bytes go between the socket and the VM's files
 * with backpressure, so a 1 GiB transfer costs the server no more memory than
 * a small one. An upload lands under its name only when the body ended; a
 * client that goes away mid-upload leaves nothing, mid-download closes the
 * file. Host, origin, credentials and the token's action ("uploadFile",
 * "downloadFile", "uploadTar", "downloadTar", "watch") are checked by the
 * dispatcher in http-api.ts before anything here runs.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { PassThrough, pipeline, type Writable } from "node:stream";
import { AgentVmError } from "../errors.ts";
import { normaliseGuestPath } from "../sandbox/filesystem.ts";
import { EventStream } from "./event-stream.ts";
import { refuseFormUpload } from "./request-origin.ts";
import type { VmActor } from "./vm-actor.ts";
import type { VmWatch } from "../watch-stream.ts";

export const TRANSFER_ROUTES = ["files", "tar", "watch"] as const;
export type TransferRoute = (typeof TRANSFER_ROUTES)[number];

/** Token action names of these routes, beside the VM actions. */
export const TRANSFER_ACTIONS = ["uploadFile", "downloadFile", "uploadTar", "downloadTar", "watch"] as const;

export function isTransferRoute(route: string): route is TransferRoute {
  return (TRANSFER_ROUTES as readonly string[]).includes(route);
}

/** What a token must allow for this route and method; UNKNOWN_ACTION for a method the route does not take. */
export function transferAction(route: TransferRoute, method: string | undefined): (typeof TRANSFER_ACTIONS)[number] {
  const reading = method === "GET" || (method === "HEAD" && route === "files");
  if (route === "watch" && method === "GET") return "watch";
  if (route === "files" && (reading || method === "PUT")) return reading ? "downloadFile" : "uploadFile";
  if (route === "tar" && (reading || method === "PUT")) return reading ? "downloadTar" : "uploadTar";
  const allowed = route === "watch" ? "GET" : route === "files" ? "GET, HEAD or PUT" : "GET or PUT";
  throw new AgentVmError("UNKNOWN_ACTION", `the ${route} route takes ${allowed}, not ${method}; see docs/http-api.md`);
}

export async function serveTransfer(actor: VmActor, route: TransferRoute, rest: string | undefined, url: URL, request: IncomingMessage, response: ServerResponse): Promise<void> {
  const path = guestPath(rest, route);
  if (request.method === "PUT") refuseFormUpload(request, `PUT …/${route}/`);
  const vm = await actor.wake();
  // The VM stays awake for as long as the transfer or the watch lasts.
  const release = actor.hold();
  response.once("close", release);
  if (route === "watch") return watch(actor, path, url, response, release);
  if (route === "files" && request.method === "PUT") {
    const sink = await vm.openWriteStream(path, { ...modeOption(url), append: flag(url, "append") });
    const size = await receive(request, response, sink);
    return sendValue(response, { path, size });
  }
  if (route === "tar" && request.method === "PUT") {
    const body = bodyOf(request);
    try {
      return sendValue(response, await vm.writeTar(path, body));
    } catch (error) {
      body.destroy();
      stopReading(request, response);
      throw error;
    }
  }
  if (route === "tar") {
    const archive = await vm.readTar(path);
    response.writeHead(200, { "content-type": "application/x-tar", "cache-control": "no-store" });
    return send(archive, response);
  }
  const range = await byteRange(request, () => vm.stat(path).then((st) => st.size));
  const file = await vm.openReadStream(path, range ?? {});
  const headers: Record<string, string | number> = {
    "content-type": "application/octet-stream",
    "content-length": file.end - file.start + 1,
    "accept-ranges": "bytes",
    "cache-control": "no-store",
    "x-agentvm-file-mode": file.mode.toString(8),
  };
  if (range) headers["content-range"] = `bytes ${file.start}-${file.end}/${file.size}`;
  response.writeHead(range ? 206 : 200, headers);
  if (request.method === "HEAD") {
    file.stream.destroy();
    response.end();
    return;
  }
  send(file.stream, response);
}

/**
 * The request body as a stream the extraction may destroy without destroying
 * the request, so a refused archive is answered instead of the connection
 * being reset. A client that goes away mid-body fails the stream, so the
 * extraction stops and removes its partial file.
 */
function bodyOf(request: IncomingMessage): PassThrough {
  const body = new PassThrough();
  request.pipe(body);
  request.once("close", () => {
    if (!request.complete) body.destroy(new AgentVmError("ECONNRESET", "upload: the client closed the connection mid-body; the entry being written was removed"));
  });
  return body;
}

/** After a refusal mid-body: the rest of the body is discarded and the connection closed after the answer. */
function stopReading(request: IncomingMessage, response: ServerResponse): void {
  if (request.complete) return;
  request.unpipe();
  if (!response.headersSent) response.setHeader("connection", "close");
  request.resume();
}

/** Streams a body out; a client that goes away ends the read (and closes the file) through pipeline. */
function send(body: NodeJS.ReadableStream, response: ServerResponse): void {
  pipeline(body, response, (error) => {
    if (error) response.destroy();
  });
}

/**
 * The request body into `sink` with backpressure; resolves with the byte count
 * once the file is committed. A body that breaks off destroys the sink, which
 * removes what it wrote. A sink that fails (VM_DISK_FULL) is answered at once:
 * the rest of the body is discarded and the connection closed after the answer.
 */
function receive(request: IncomingMessage, response: ServerResponse, sink: Writable): Promise<number> {
  return new Promise((resolve, reject) => {
    let size = 0;
    let settled = false;
    let waiting = false;
    const fail = (error: unknown) => {
      if (settled) return;
      settled = true;
      sink.destroy();
      stopReading(request, response);
      reject(error instanceof AgentVmError ? error : new AgentVmError("ECONNRESET", `upload: the request body broke off (${(error as Error)?.message ?? String(error)}); nothing was written`));
    };
    request.on("data", (chunk: Buffer) => {
      if (settled) return;
      size += chunk.byteLength;
      if (!sink.write(chunk) && !waiting) {
        waiting = true;
        request.pause();
        sink.once("drain", () => {
          waiting = false;
          request.resume();
        });
      }
    });
    request.once("end", () => {
      if (!settled) sink.end();
    });
    request.once("error", fail);
    request.once("close", () => {
      if (!request.complete) fail(new Error("the client closed the connection mid-body"));
    });
    sink.once("error", fail);
    sink.once("finish", () => {
      if (settled) return;
      settled = true;
      resolve(size);
    });
  });
}

async function watch(actor: VmActor, path: string, url: URL, response: ServerResponse, release: () => void): Promise<void> {
  let watching: VmWatch | undefined;
  const stream = new EventStream(response, () => {
    void watching?.close();
    release();
  });
  watching = await actor.use((vm) => vm.watch(path, { recursive: flag(url, "recursive"), onEvent: (event) => stream.send("watch", event) }));
  // The watch ended under the client (its path was deleted, the VM was destroyed or went to sleep).
  watching.closed.catch((error: unknown) => stream.closeWith(AgentVmError.from(error)));
  if (response.destroyed) {
    void watching.close();
    return;
  }
  stream.open();
}

/** The guest path after the route name: absolute, each segment percent-decoded. */
function guestPath(rest: string | undefined, route: TransferRoute): string {
  const raw = rest ?? "";
  let decoded: string;
  try {
    decoded = raw.split("/").map((segment) => decodeURIComponent(segment)).join("/");
  } catch {
    throw new AgentVmError("INVALID_ARGUMENT", `the path after /${route}/ is not valid percent-encoding`);
  }
  if (decoded.includes("\0")) throw new AgentVmError("INVALID_ARGUMENT", `the path after /${route}/ must not contain NUL`);
  if (decoded === "" || decoded === "/") {
    if (route === "files") throw new AgentVmError("INVALID_ARGUMENT", "name a file after /files/, e.g. /files/home/agentos/report.csv");
    return "/";
  }
  // Always absolute: the URL cannot name a path relative to the home.
  return normaliseGuestPath("path", decoded.startsWith("/") ? decoded : `/${decoded}`);
}

function flag(url: URL, name: string): boolean {
  const value = url.searchParams.get(name);
  if (value === null || value === "0" || value === "false") return false;
  if (value === "" || value === "1" || value === "true") return true;
  throw new AgentVmError("INVALID_ARGUMENT", `?${name} must be 1/true or 0/false, got ${JSON.stringify(value)}`);
}

/** `?mode=` in octal (644, 0644 or 0o644). */
function modeOption(url: URL): { mode?: number } {
  const text = url.searchParams.get("mode");
  if (text === null) return {};
  const match = /^(?:0o?)?([0-7]{1,4})$/.exec(text);
  if (!match) throw new AgentVmError("INVALID_ARGUMENT", `?mode must be octal permission bits like 644 or 755, got ${JSON.stringify(text)}`);
  return { mode: parseInt(match[1]!, 8) };
}

/**
 * One `bytes=` range (first-last, first-, or -suffix); undefined for none or
 * several (then the whole file is sent, as RFC 9110 allows).
 */
async function byteRange(request: IncomingMessage, size: () => Promise<number>): Promise<{ start: number; end?: number } | undefined> {
  const header = request.headers.range;
  if (header === undefined) return undefined;
  const match = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!match || (match[1] === "" && match[2] === "")) return undefined;
  if (match[1] === "") {
    const total = await size();
    const suffix = Number(match[2]);
    if (suffix === 0) throw new AgentVmError("RANGE_NOT_SATISFIABLE", `Range ${header}: a suffix of 0 bytes names nothing`);
    return { start: Math.max(0, total - suffix) };
  }
  const start = Number(match[1]);
  const end = match[2] === "" ? undefined : Number(match[2]);
  if (!Number.isSafeInteger(start) || (end !== undefined && (!Number.isSafeInteger(end) || end < start))) return undefined;
  return end === undefined ? { start } : { start, end };
}

function sendValue(response: ServerResponse, value: unknown): void {
  const body = JSON.stringify({ value });
  response.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  response.end(body);
}
