/**
 * What handle.spawn() resolves to: `{ pid }`, as ever, plus methods for that
 * process — each one the action of the same name with this pid.
 */
import type { ProcessLogs } from "../vm.ts";

export interface ClientProcess {
  /** The program's pid in the VM. */
  readonly pid: number;
  /** Resolves with the exit code once it exits (128 + the signal's number when a signal ended it). */
  wait(): Promise<number>;
  /** Signals it (default SIGTERM). */
  kill(signal?: string | number): Promise<void>;
  readonly stdin: {
    write(data: string | Uint8Array): Promise<void>;
    /** Closes its stdin (end of input). */
    end(): Promise<void>;
  };
  /** Its recent output (getProcessLogs): after position `since`, or the last `tail` bytes. */
  logs(options?: { since?: number; tail?: number }): Promise<ProcessLogs>;
}

type Call = (action: string, args: unknown[]) => Promise<unknown>;

export function processHandle(pid: number, call: Call): ClientProcess {
  const handle = { pid } as ClientProcess;
  // Not enumerable: the value still looks (and serializes) like the plain { pid } it always was.
  Object.defineProperties(handle, {
    wait: { value: () => call("waitProcess", [pid]) },
    kill: { value: (signal?: string | number) => call("killProcess", signal === undefined ? [pid] : [pid, signal]) },
    stdin: {
      value: Object.freeze({
        write: (data: string | Uint8Array) => call("writeProcessStdin", [pid, data]),
        end: () => call("closeProcessStdin", [pid]),
      }),
    },
    logs: { value: (options?: { since?: number; tail?: number }) => call("getProcessLogs", options === undefined ? [pid] : [pid, options]) },
  });
  return handle;
}
