/**
 * The client's streamed file routes (docs/http-api.md, "Files as streams"):
 * upload and download of any size, directories as tar, and watches. Bodies are
 * streamed both ways; nothing here holds a whole file.
 *
 * In browsers, fetch can stream a request body only over HTTP/2, so upload a
 * Blob or Uint8Array there; streams and async iterables are for Node.
 */
import { AgentVmError, invalidArgument } from "../errors.ts";
import type { TarExtractResult } from "../sandbox/vm-tar.ts";
import { WatchStream, type VmWatch, type WatchEvent, type WatchOptions } from "../watch-stream.ts";
import type { VmRequest } from "./client.ts";
import { readServerEvents } from "./server-events.ts";

export interface TransferProgress {
  /** Bytes sent or received so far. */
  bytes: number;
  /** Bytes in all, when known. */
  total?: number;
}

export type UploadBody = Uint8Array | ArrayBuffer | Blob | string | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

export interface TransferOptions {
  /** Called as bytes go (for each chunk of a stream; once at the end for a Uint8Array or Blob). */
  onProgress?: (progress: TransferProgress) => void;
  signal?: AbortSignal;
}

export interface UploadOptions extends TransferOptions {
  /** Permission bits, e.g. 0o755 (default 0o644; at most 0o777). */
  mode?: number;
  /** Add to the end of the file instead of replacing it. */
  append?: boolean;
}

export interface DownloadOptions extends TransferOptions {
  /** First byte offset (default 0). */
  start?: number;
  /** Last byte offset, inclusive (default: the end of the file). */
  end?: number;
}

export interface ClientWatchOptions extends WatchOptions {
  signal?: AbortSignal;
}

const HOME = "/home/agentos";

/**
 * `request(route, init)` sends to the VM's routes (`route` is relative to
 * /api/{definition}/{key}): on the server, or in a cluster on the node that
 * holds the VM.
 */
export function fileTransfers(request: VmRequest) {
  const url = (route: string, path: string, query: Record<string, string> = {}) => {
    const search = new URLSearchParams(query).toString();
    return `/${route}${encodeGuestPath(path)}${search ? `?${search}` : ""}`;
  };

  async function put(route: string, path: string, body: UploadBody, type: string, options: UploadOptions, query: Record<string, string>): Promise<unknown> {
    const { body: sent, total } = uploadBody(body, options.onProgress);
    const response = await request(url(route, path, query), {
      method: "PUT",
      headers: { "content-type": type },
      body: sent as RequestInit["body"],
      signal: options.signal ?? null,
      ...(sent instanceof ReadableStream ? { duplex: "half" as const } : {}),
    });
    const value = ((await response.json()) as { value: unknown }).value;
    if (total !== undefined) options.onProgress?.({ bytes: total, total });
    return value;
  }

  async function get(route: string, path: string, options: DownloadOptions, headers: Record<string, string> = {}): Promise<ReadableStream<Uint8Array>> {
    const response = await request(url(route, path), { method: "GET", headers, signal: options.signal ?? null });
    const length = response.headers.get("content-length");
    return counted(response.body ?? emptyStream(), options.onProgress, length === null ? undefined : Number(length), (error) =>
      (error as Error)?.name === "AbortError" ? error : new AgentVmError("ECONNRESET", `download ${path}: the transfer broke off (${(error as Error)?.message ?? String(error)})`, { cause: error }),
    );
  }

  return {
    /** Uploads a file of any size as a stream; it appears under `path` only once complete. */
    async upload(path: string, body: UploadBody, options: UploadOptions = {}): Promise<{ path: string; size: number }> {
      const query: Record<string, string> = {};
      if (options.mode !== undefined) {
        if (!Number.isInteger(options.mode) || options.mode < 0 || options.mode > 0o777) throw invalidArgument(`upload: mode must be permission bits from 0 to 0o777, got ${String(options.mode)}`);
        query.mode = options.mode.toString(8);
      }
      if (options.append) query.append = "1";
      return (await put("files", path, body, "application/octet-stream", options, query)) as { path: string; size: number };
    },
    /** A file as a stream (from `start` to `end` when given). */
    download(path: string, options: DownloadOptions = {}): Promise<ReadableStream<Uint8Array>> {
      const { start, end } = options;
      if ((start !== undefined && !(Number.isSafeInteger(start) && start >= 0)) || (end !== undefined && !(Number.isSafeInteger(end) && end >= (start ?? 0)))) {
        throw invalidArgument(`download: start and end must be byte offsets with start ≤ end, got ${String(start)} and ${String(end)}`);
      }
      const range: Record<string, string> = start !== undefined || end !== undefined ? { range: `bytes=${start ?? 0}-${end ?? ""}` } : {};
      return get("files", path, options, range);
    },
    /** Extracts a tar stream into `dir`; resolves with what was extracted. */
    async uploadTar(dir: string, body: UploadBody, options: TransferOptions = {}): Promise<TarExtractResult> {
      return (await put("tar", dir, body, "application/x-tar", options, {})) as TarExtractResult;
    },
    /** A directory as a tar stream (modes and symlinks kept). */
    downloadTar(dir: string, options: TransferOptions = {}): Promise<ReadableStream<Uint8Array>> {
      return get("tar", dir, options);
    },
    /**
     * Watches a path inside the VM; resolves once the watch is in place (ENOENT
     * for a missing path). Iterate it, or pass onEvent; close() ends it.
     */
    async watch(path: string, options: ClientWatchOptions = {}): Promise<VmWatch> {
      if (options === null || typeof options !== "object") throw invalidArgument(`watch: options must be an object, got ${String(options)}`);
      if (options.recursive !== undefined && typeof options.recursive !== "boolean") throw invalidArgument(`watch: options.recursive must be a boolean, got ${JSON.stringify(options.recursive)}`);
      if (options.onEvent !== undefined && typeof options.onEvent !== "function") throw invalidArgument(`watch: options.onEvent must be a function, got ${typeof options.onEvent}`);
      const controller = new AbortController();
      options.signal?.addEventListener("abort", () => controller.abort(), { once: true });
      const target = url("watch", path, options.recursive ? { recursive: "1" } : {});
      const response = await request(target, { method: "GET", headers: { accept: "text/event-stream" }, signal: controller.signal });
      const watch = new WatchStream(normaliseGuestPath(path), options.onEvent, () => controller.abort());
      const connected = Promise.withResolvers<void>();
      readServerEvents(response.body!, target, {
        connected: connected.resolve,
        event(name, data) {
          if (name === "error") throw AgentVmError.from(JSON.parse(data));
          if (name === "watch") watch.push([JSON.parse(data) as WatchEvent]);
        },
      }).catch((error: unknown) => {
        const shaped = error instanceof AgentVmError ? error : new AgentVmError("ECONNRESET", `the watch connection ${target} failed: ${(error as Error)?.message ?? String(error)}`, { cause: error });
        connected.reject(shaped);
        watch.end(shaped);
      });
      await connected.promise;
      return watch;
    },
  };
}

/** `/a/b c` → `/a/b%20c`, dot segments resolved first (a URL would resolve them against the route). */
function encodeGuestPath(path: string): string {
  return normaliseGuestPath(path)
    .split("/")
    .map((segment) => encodeURIComponent(segment))
    .join("/");
}

function normaliseGuestPath(path: string): string {
  if (typeof path !== "string" || path.length === 0) throw invalidArgument(`path must be a non-empty string, got ${JSON.stringify(path)}`);
  const parts: string[] = [];
  for (const part of (path.startsWith("/") ? path : `${HOME}/${path}`).split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") parts.pop();
    else parts.push(part);
  }
  return `/${parts.join("/")}`;
}

function uploadBody(body: UploadBody, onProgress: TransferOptions["onProgress"]): { body: Uint8Array | ArrayBuffer | Blob | ReadableStream<Uint8Array>; total?: number } {
  if (typeof body === "string") body = new TextEncoder().encode(body);
  if (body instanceof Uint8Array || body instanceof ArrayBuffer) return { body, total: body.byteLength };
  if (typeof Blob !== "undefined" && body instanceof Blob) return { body, total: body.size };
  const stream = body instanceof ReadableStream ? body : iterableStream(body as AsyncIterable<Uint8Array>);
  if (!(stream instanceof ReadableStream)) throw invalidArgument("upload: body must be a Uint8Array, ArrayBuffer, Blob, string, ReadableStream or async iterable of Uint8Array");
  return { body: onProgress ? counted(stream, onProgress, undefined, (error) => error) : stream };
}

function iterableStream(iterable: AsyncIterable<Uint8Array>): ReadableStream<Uint8Array> | undefined {
  if (iterable === null || typeof iterable !== "object" || typeof iterable[Symbol.asyncIterator] !== "function") return undefined;
  const iterator = iterable[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const { value, done } = await iterator.next();
      if (done) controller.close();
      else controller.enqueue(value);
    },
    async cancel(reason) {
      await iterator.return?.(reason);
    },
  });
}

/** The same stream, counting bytes for onProgress and shaping a failure with `failed`. */
function counted(source: ReadableStream<Uint8Array>, onProgress: TransferOptions["onProgress"], total: number | undefined, failed: (error: unknown) => unknown): ReadableStream<Uint8Array> {
  const reader = source.getReader();
  let bytes = 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const { value, done } = await reader.read();
        if (done) {
          controller.close();
          return;
        }
        bytes += value.byteLength;
        controller.enqueue(value);
        onProgress?.(total === undefined ? { bytes } : { bytes, total });
      } catch (error) {
        controller.error(failed(error));
      }
    },
    cancel: (reason) => reader.cancel(reason),
  });
}

function emptyStream(): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({ start: (controller) => controller.close() });
}
