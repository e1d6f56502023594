/**
 * The one error type of agentvm. Every public function and route fails with an
 * AgentVmError whose `code` is stable and part of the API (docs/errors.md lists
 * them; a test keeps the two in agreement). Kernel failures use POSIX names so
 * guest code sees what Node would give it; everything else uses a prefixed name.
 *
 * Compare `code`, never `instanceof`: errors cross process boundaries (guest IPC,
 * client/server) and arrive as plain objects rebuilt with `AgentVmError.from`.
 */

export const POSIX_CODES = [
  "EACCES",
  "EADDRINUSE",
  "EADDRNOTAVAIL",
  "EAGAIN",
  "ECONNREFUSED",
  "ECONNRESET",
  "EEXIST",
  "EINVAL",
  "EISDIR",
  "ELOOP",
  "EMFILE",
  "ENOENT",
  "ENOTDIR",
  "ENOTEMPTY",
  "ENOSPC",
  "ENOTFOUND",
  "ENOTSUP",
  "EPERM",
  "EPIPE",
  "EROFS",
  "ESRCH",
  "ETIMEDOUT",
] as const;

export const AGENTVM_CODES = [
  /** An argument has the wrong type or is out of range. */
  "INVALID_ARGUMENT",
  /** A path names something outside the VM's root. */
  "PATH_OUTSIDE_VM",
  /** The VM was disposed; create a new one. */
  "VM_DISPOSED",
  /** bubblewrap (or another sandbox prerequisite) is missing. */
  "SANDBOX_UNAVAILABLE",
  /** The VM's sandbox ended (its init exited or was stopped); the VM's processes were ended with it. */
  "SANDBOX_EXITED",
  /** The pinned guest Node.js binary could not be found. */
  "GUEST_RUNTIME_MISSING",
  /** The VM image (the read-only userland) could not be built; the message says why and what to do. */
  "IMAGE_BUILD_FAILED",
  /** A per-VM resource cap (processes, sockets, buffered bytes) was reached. */
  "LIMIT_EXCEEDED",
  /** The VM's disk is full: limits.diskBytes or limits.diskInodes reached. */
  "VM_DISK_FULL",
  /** A guest broke the kernel protocol; its stream or process was ended. */
  "PROTOCOL_VIOLATION",
  /** A guest process could not be started. */
  "SPAWN_FAILED",
  /** An HTTP exchange with a guest failed after the connection was made. */
  "FETCH_FAILED",
  /** A preview TTL is negative, NaN, infinite or not a number. */
  "PREVIEW_TTL_INVALID",
  /** A preview TTL is above preview.maxExpiresInSeconds. */
  "PREVIEW_TTL_TOO_LONG",
  /** The VM has preview.maxActiveTokens active preview URLs. */
  "PREVIEW_TOKEN_LIMIT",
  /** The server has no such action or route. */
  "UNKNOWN_ACTION",
  /** A request body could not be read as the route expects. */
  "MALFORMED_REQUEST",
  /** A request body is larger than the server accepts. */
  "PAYLOAD_TOO_LARGE",
  /** A request's headers are larger than the server accepts (limits.maxHeaderBytes). */
  "HEADERS_TOO_LARGE",
  /** A client address has limits.maxConnectionsPerClient connections open already. */
  "TOO_MANY_CONNECTIONS",
  /** A definition has limits.maxVmsPerDefinition VMs; destroy some before a new key can start one. */
  "TOO_MANY_VMS",
  /** The request carries no valid API key or token (missing, unknown, revoked, expired or badly signed). */
  "UNAUTHENTICATED",
  /** The request's token does not cover this VM or action, or the route needs an API key. */
  "FORBIDDEN",
  /** The request's Host header is not in the server's allowedHosts (DNS rebinding defence). */
  "HOST_NOT_ALLOWED",
  /** The request comes from a browser page on an origin the server does not trust. */
  "ORIGIN_NOT_ALLOWED",
  /** The request body's content type is not one the route accepts (cross-site form defence). */
  "UNSUPPORTED_MEDIA_TYPE",
  /** An event stream, a terminal or a streamed exec fell too far behind its reader and was closed; its last message says so. */
  "EVENTS_TOO_SLOW",
  /** A WebSocket route (the terminal) was requested without a WebSocket upgrade. */
  "UPGRADE_REQUIRED",
  /** exec ran longer than its timeoutMs; the process was killed and `details` holds what it printed. */
  "EXEC_TIMEOUT",
  /** exec printed more than its maxOutputBytes; the process was killed and `details` holds the output up to the cap. */
  "EXEC_OUTPUT_LIMIT",
  /** A VM destroy without `confirm` equal to the VM's key; nothing was changed. */
  "DESTROY_NOT_CONFIRMED",
  /** A VM destroy stopped midway (its files could not all be removed); destroying it again finishes. Until then the VM does not wake. */
  "VM_DESTROY_FAILED",
  /** registry.start() on a non-loopback host without an API key. */
  "AUTH_NOT_CONFIGURED",
  /** The server is shutting down; retry against a running server. */
  "SERVER_CLOSING",
  /** The client could not reach the server. */
  "SERVER_UNREACHABLE",
  /** Cluster mode needs rivetkit (the Rivet Engine runner and its engine binary), which is not installed; the message says how to install it. */
  "CLUSTER_UNAVAILABLE",
  /** The cluster node that holds this VM's files is down or unreachable; the VM answers again when that node returns. */
  "VM_NODE_UNAVAILABLE",
  /** A preview belongs to another cluster node that cannot be reached now (the engine's node list unreadable, or the node not answering). */
  "PREVIEW_NODE_UNAVAILABLE",
  /** This node does not hold the VM (it was placed on another node): locate it again through the engine. */
  "VM_MOVED",
  /** A download's Range header names no bytes of the file. */
  "RANGE_NOT_SATISFIABLE",
  /** Something that should not happen; the message says what. */
  "INTERNAL",
] as const;

export type PosixCode = (typeof POSIX_CODES)[number];
export type AgentVmCode = (typeof AGENTVM_CODES)[number];
export type ErrorCode = PosixCode | AgentVmCode;

const ALL_CODES: ReadonlySet<string> = new Set<string>([...POSIX_CODES, ...AGENTVM_CODES]);

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === "string" && ALL_CODES.has(value);
}

export interface ErrorShape {
  code: ErrorCode;
  message: string;
  /** What the failed operation had got that far (exec's captured output), when it has anything. */
  details?: Record<string, unknown>;
}

export class AgentVmError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super(message, options);
    this.name = "AgentVmError";
    this.code = code;
    this.details = options?.details;
  }

  toJSON(): ErrorShape {
    return this.details ? { code: this.code, message: this.message, details: this.details } : { code: this.code, message: this.message };
  }

  /** Rebuilds an error from its wire shape, or wraps anything else as INTERNAL. */
  static from(value: unknown): AgentVmError {
    if (value instanceof AgentVmError) return value;
    if (value && typeof value === "object") {
      const { code, message, details } = value as { code?: unknown; message?: unknown; details?: unknown };
      if (isErrorCode(code)) {
        const withDetails = details && typeof details === "object" && !Array.isArray(details) ? { details: details as Record<string, unknown> } : {};
        return new AgentVmError(code, String(message ?? code), withDetails);
      }
      if (typeof message === "string") return new AgentVmError("INTERNAL", message, { cause: value });
    }
    return new AgentVmError("INTERNAL", String(value));
  }
}

/** Shorthand for argument validation failures. */
export function invalidArgument(message: string): AgentVmError {
  return new AgentVmError("INVALID_ARGUMENT", message);
}
