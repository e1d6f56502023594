/**
 * agentvm — the server and embedded API. `agentvm/client` is the typed client.
 */
export { createVm, Vm } from "./vm.ts";
export type { CreateVmOptions, VmLimits, VmUsage, PermissionsConfig, ProcessOutputEvent, ProcessExitEvent, VmEvents } from "./vm.ts";
export type { VmStat } from "./sandbox/filesystem.ts";
export type { ProcessInfo } from "./sandbox/process-table.ts";
export type { ListenConfig } from "./policy/listen-policy.ts";
export type { VmFetchInit, VmFetchResponse, VmFetchStreamResponse, VmFetchBody } from "./net/vm-fetch.ts";
export { AgentVmError, AGENTVM_CODES, POSIX_CODES } from "./errors.ts";
export type { ErrorCode, AgentVmCode, PosixCode } from "./errors.ts";
export { agentOS, agentOs, setup, Registry, generateApiKey, hashApiKey, TOKEN_ACTIONS } from "./server/index.ts";
export type { AuthOptions, MintedToken, TokenAction, TokenRequest } from "./server/index.ts";
export type { AgentOsConfig, PreviewConfig, SoftwarePackage, VmDefinition, StartOptions, RunningServer, DestroyResult, VmSummary, VmStatus } from "./server/index.ts";
export type { LifecycleConfig, ServiceConfig, ServerLimits, LogLevel, PreviewUrlMode } from "./server/index.ts";
export type { ExecOptions, ExecResult, ProcessLogs, FileReadStream, SpawnOptions, VmLifecycle } from "./vm.ts";
export type { WriteOptions } from "./sandbox/filesystem.ts";
export type { TarExtractResult } from "./sandbox/vm-tar.ts";
export type { VmWatch, WatchEvent, WatchOptions } from "./watch-stream.ts";
export type { PreviewUrl, PreviewInfo } from "./net/previews.ts";
