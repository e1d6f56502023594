/**
 * The control channel between the server and a VM's init (Node IPC over the
 * sandbox's fd 3, JSON serialization). One channel per VM; messages are small
 * JSON objects, bytes travel base64-encoded, and connected sockets travel as
 * handles beside a message (SCM_RIGHTS), never as bytes.
 *
 * Requests carry an `id` and get exactly one `reply` with the same id. Both
 * sides validate every message they receive: init is inside the VM, so the
 * server treats what it says as untrusted input.
 */

/** Server → init. */
export type ToInit =
  | { t: "spawn"; id: number; command: string; args: string[]; cwd: string; env: Record<string, string>; terminal?: TerminalSize }
  /** A new window size for a program started with `terminal` (SIGWINCH to its foreground group). */
  | { t: "resize"; pid: number; cols: number; rows: number }
  | { t: "signal"; pid: number; signal: string }
  | { t: "stdin"; id: number; pid: number; data: string }
  | { t: "stdin-end"; pid: number }
  /**
   * Connect to a port on the VM's loopback; the reply carries the connected socket as its handle.
   * While nothing listens yet, init waits for a listener as long as one of `wait`'s programs
   * still runs and its `ms` (from when init got the request) have not passed: programs that
   * may still be starting up. ECONNREFUSED once none is left.
   */
  | { t: "connect"; id: number; port: number; wait?: ListenWait[] }
  /** TCP ports in LISTEN state on the VM's loopback (both families). */
  | { t: "ports"; id: number }
  /** Every process of the VM but bubblewrap's reaper and init, as `ps` sees them. */
  | { t: "ps"; id: number }
  /** Start watching a guest path; events arrive as watch-events for `watch` until unwatch or watch-end. */
  | { t: "watch"; id: number; watch: number; path: string; recursive: boolean }
  | { t: "unwatch"; watch: number }
  /** Answer to init's egress request: the handle is the connected socket (ok) or absent (denied/failed). */
  | { t: "egress"; id: number; ok: true }
  | { t: "egress"; id: number; ok: false; code: string; message: string }
  | { t: "resolved"; id: number; ok: true; addresses: string[] }
  | { t: "resolved"; id: number; ok: false; code: string; message: string };

/** Init → server. */
export type FromInit =
  | { t: "ready"; pid: number }
  | { t: "reply"; id: number; ok: true; pid?: number; ports?: number[]; processes?: VmProcess[] }
  | { t: "reply"; id: number; ok: false; code: string; message: string }
  | { t: "output"; pid: number; fd: 1 | 2; data: string }
  | { t: "exit"; pid: number; code: number | null; signal: string | null }
  /** init asks the server for an outbound connection (its proxies decided nothing yet; the server's policy decides). */
  | { t: "egress"; id: number; host: string; port: number; via: string; pid?: number }
  | { t: "resolve"; id: number; name: string; family: 4 | 6; pid?: number }
  | { t: "watch-events"; watch: number; events: WatchEvent[] }
  /** A watch ended on its own (its path was deleted); no more events for it. */
  | { t: "watch-end"; watch: number; code: string; message: string };

export const WATCH_EVENT_TYPES = ["create", "modify", "delete", "rename", "overflow"] as const;

/**
 * A change under a watched path, named by guest paths. `rename` has the old
 * name in `oldPath`; `overflow` says events were dropped (re-read the tree).
 */
export interface WatchEvent {
  type: (typeof WATCH_EVENT_TYPES)[number];
  path: string;
  oldPath?: string;
}

/** A program of the VM that may still open a port: requests to a closed port wait up to `ms` for it (see connect). */
export interface ListenWait {
  pid: number;
  ms: number;
}

/** The longest a connect waits for a listener, and the most programs one names (more than a VM's process cap). */
export const MAX_LISTEN_WAIT = { ms: 60_000, programs: 4096 } as const;

/** A pseudo-terminal's window, in character cells. */
export interface TerminalSize {
  cols: number;
  rows: number;
}

/** The window sizes the API accepts, in each dimension. */
export const TERMINAL_SIZE_RANGE = { min: 1, max: 1000 } as const;

/** A process of the VM as init reads it from /proc. */
export interface VmProcess {
  pid: number;
  ppid: number;
  argv: string[];
  cwd: string;
  /** Milliseconds since the epoch. */
  startedAt: number;
}

/** Signals the API accepts by name, with their Linux numbers. */
export const SIGNALS: Readonly<Record<string, number>> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGKILL: 9,
  SIGUSR1: 10,
  SIGUSR2: 12,
  SIGTERM: 15,
  SIGCONT: 18,
  SIGSTOP: 19,
};

/** Most events in one watch-events message (one coalesced batch). */
export const MAX_WATCH_BATCH = 1024;
/** Watches a VM may have open at once. */
export const MAX_WATCHES = 64;

/** Output init may have sent and not yet seen acknowledged before it pauses a process's pipes. */
export const OUTPUT_WINDOW = 1 << 20;
/** The largest base64 `data` the server accepts in one message (chunks are 64 KiB raw). */
export const MAX_DATA_CHARS = 1 << 20;
/**
 * The longest message the server reads from init (JSON text before its newline): past it the
 * VM's channel is cut off (see sandbox/ipc-reader-guard.ts). Above every message init sends:
 * a watch batch at most (1024 events, two 4096-character paths each, JSON-escaped) stays
 * below it, and init fits a ps reply into MAX_PS_REPLY_CHARS.
 */
export const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
/** How much of a ps reply init fills with processes' details (argv, cwd); past it they are shortened. */
export const MAX_PS_REPLY_CHARS = 32 * 1024 * 1024;

/**
 * init's servers on the VM's loopback. Below 1024, so no program of a VM with
 * the default listen policy can take them; DNS must be 53 for resolv.conf.
 */
export const EGRESS_PORTS = { dns: 53, http: 1003, socks5: 1004, node: 1005 } as const;
