/**
 * Starts a program on a pseudo-terminal inside the VM, with @lydell/node-pty
 * (node-pty with prebuilt N-API binaries, shipped beside init in dist/init):
 * forkpty gives the program a new session whose controlling terminal is the
 * pty, so job control, Ctrl-C (the line discipline's SIGINT to the foreground
 * group), window sizes and full-screen programs behave as in a local terminal.
 *
 * The program is exec'd through the same setpriv wrapper as every other guest
 * program (no capabilities, no-new-privs); it inherits init's seccomp filter,
 * rlimits, namespaces and control groups like any process of the VM.
 */
import { createRequire } from "node:module";
import type { IPty } from "@lydell/node-pty";

const require = createRequire(import.meta.url);
/** Loaded on first use: a VM that never opens a terminal never loads the native addon. */
let ptyModule: typeof import("@lydell/node-pty") | undefined;

export interface TerminalStart {
  /** setpriv and its arguments, then the program and its arguments. */
  file: string;
  args: string[];
  cwd: string;
  env: Record<string, string>;
  cols: number;
  rows: number;
}

export function startOnTerminal(start: TerminalStart): IPty {
  ptyModule ??= require("@lydell/node-pty") as typeof import("@lydell/node-pty");
  return ptyModule.spawn(start.file, start.args, {
    name: start.env.TERM ?? "xterm-256color",
    cols: start.cols,
    rows: start.rows,
    cwd: start.cwd,
    env: start.env,
    // Bytes, not text: a UTF-8 sequence split across reads must reach the client whole.
    encoding: null,
  });
}
