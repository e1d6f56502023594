/**
 * agentvm/client — the typed client for an agentvm server.
 */
export { createClient, canonicalKey } from "./client.ts";
export type { AgentVmClient, ClientOptions, ClientFetchInit, VmHandle, VmAccessor, VmConnection, VmConnectionEvents, VmActions, ServerPreviewUrl, VmSummary, DestroyResult } from "./types.ts";
export type { UploadBody, UploadOptions, DownloadOptions, TransferOptions, TransferProgress, ClientWatchOptions } from "./file-transfer.ts";
export type { VmWatch, WatchEvent, WatchOptions } from "../watch-stream.ts";
export type { TarExtractResult } from "../sandbox/vm-tar.ts";
export { AgentVmError } from "../errors.ts";
export type { ErrorCode } from "../errors.ts";
