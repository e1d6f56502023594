/**
 * Client types, derived from the server's own types through type-only imports:
 * a handle's methods are the `Vm` methods named in VM_ACTIONS, returning
 * promises. Nothing here exists at run time.
 */
import type { VmActionName } from "../actions.ts";
import type { Registry } from "../server/registry.ts";
import type { VmDefinition } from "../server/definition.ts";
import type { ProcessExitEvent, ProcessOutputEvent, Vm } from "../vm.ts";
import type { VmFetchInit, VmFetchResponse, VmFetchStreamResponse } from "../net/vm-fetch.ts";
import type { PreviewUrl } from "../net/previews.ts";
import type { DestroyResult, VmSummary } from "../server/vm-actor.ts";
import type { TarExtractResult } from "../sandbox/vm-tar.ts";
import type { VmWatch } from "../watch-stream.ts";
import type { ClientWatchOptions, DownloadOptions, TransferOptions, UploadBody, UploadOptions } from "./file-transfer.ts";

export type { DestroyResult, VmSummary };

type Remote<F> = F extends (...args: infer A) => infer R ? (...args: A) => Promise<Awaited<R>> : never;

/** A preview URL from the server: `url` is always set, on the server's preview origin. */
export type ServerPreviewUrl = PreviewUrl & { url: string };

type RemoteActions = { [K in VmActionName]: Remote<Vm[K]> };

export type VmActions = Omit<RemoteActions, "createSignedPreviewUrl"> & {
  createSignedPreviewUrl(...args: Parameters<Vm["createSignedPreviewUrl"]>): Promise<ServerPreviewUrl>;
};

/** vmFetch options on the client: what fetch accepts, minus what only the host has. */
export type ClientFetchInit = Omit<VmFetchInit, "body"> & {
  body?: string | Uint8Array | ArrayBuffer | ReadableStream<Uint8Array> | null;
};

export interface VmConnectionEvents {
  processOutput: ProcessOutputEvent;
  processExit: ProcessExitEvent;
}

export interface VmConnection {
  /** Resolves once the server has opened the event stream (events after this are not missed). */
  readonly ready: Promise<void>;
  /**
   * Settles when the connection ends: resolves once dispose() closed it, rejects
   * (ECONNRESET, SERVER_UNREACHABLE, …) when the server or the network ended it.
   */
  readonly closed: Promise<void>;
  on<E extends keyof VmConnectionEvents>(event: E, listener: (payload: VmConnectionEvents[E]) => void): () => void;
  off<E extends keyof VmConnectionEvents>(event: E, listener: (payload: VmConnectionEvents[E]) => void): void;
  /** Closes the connection. */
  dispose(): Promise<void>;
}

export type VmHandle = VmActions & {
  readonly key: string;
  vmFetch(port: number, path: string, init?: ClientFetchInit): Promise<VmFetchResponse>;
  vmFetchStream(port: number, path: string, init?: ClientFetchInit): Promise<VmFetchStreamResponse>;
  /**
   * Opens a connection that delivers processOutput and processExit events.
   * With `since` (an output position, e.g. 0 or the `seq` of the last event
   * seen), output the processes' logs still hold after it comes first.
   */
  connect(options?: { since?: number }): VmConnection;
  /**
   * Uploads a file of any size as a stream (PUT …/files/<path>). It appears
   * under `path` only once the whole body arrived; an upload that breaks off
   * leaves nothing.
   */
  upload(path: string, body: UploadBody, options?: UploadOptions): Promise<{ path: string; size: number }>;
  /** A file as a web ReadableStream (GET …/files/<path>), all of it or bytes `start`..`end`. */
  download(path: string, options?: DownloadOptions): Promise<ReadableStream<Uint8Array>>;
  /** Extracts a tar stream into a directory of the VM (PUT …/tar/<dir>). */
  uploadTar(dir: string, body: UploadBody, options?: TransferOptions): Promise<TarExtractResult>;
  /** A directory as a tar stream, modes and symlinks kept (GET …/tar/<dir>). */
  downloadTar(dir: string, options?: TransferOptions): Promise<ReadableStream<Uint8Array>>;
  /**
   * Watches a path inside the VM (GET …/watch/<path>): create, modify, delete,
   * rename (and overflow) events with guest paths. Resolves once the watch is in
   * place; ENOENT for a missing path. Keeps the VM awake until closed.
   */
  watch(path: string, options?: ClientWatchOptions): Promise<VmWatch>;
  /**
   * Destroys the VM for good: ends its processes, deletes its files, rows and
   * preview URLs. `confirm` must be this VM's key (DESTROY_NOT_CONFIRMED
   * otherwise, and nothing changes). The key then starts a fresh, empty VM.
   * Needs an API key or a token that lists "destroy".
   */
  destroy(options: { confirm: string | readonly string[] }): Promise<DestroyResult>;
};

export interface VmAccessor {
  /** The VM for `key`, created on first use. `["key"]` and `"key"` name the same VM. */
  getOrCreate(key: string | readonly string[]): VmHandle;
  /**
   * This definition's VMs in key order, awake or asleep, without waking any:
   * at most `limit` (default and maximum 1000); pass the last key seen as
   * `after` for the next page. Needs an API key.
   */
  list(options?: { after?: string; limit?: number }): Promise<VmSummary[]>;
}

export type AgentVmClient<R> = R extends Registry<infer Use> ? { readonly [K in keyof Use]: Use[K] extends VmDefinition ? VmAccessor : never } : never;

export interface ClientOptions {
  /** Server URL, e.g. http://localhost:6420 */
  endpoint: string;
  /**
   * An API key or a scoped token, sent as `Authorization: Bearer <token>`.
   * Default: AGENTVM_TOKEN from the environment (in Node); "" sends none.
   */
  token?: string;
  /** Extra headers on every request (e.g. an auth token for a proxy in front of the server). */
  headers?: Record<string, string>;
  /** A fetch implementation (default: the global fetch). */
  fetch?: typeof fetch;
}
