/**
 * How much of a VM's process list the server relays. The command lines of
 * processes the guest started come from the VM (init reads them from its
 * /proc), so their size is the guest's to choose: a program can put megabytes
 * in its argv, and a guest with many such processes would make every
 * listProcesses answer (and the dashboard polling it) that large. The server
 * cuts each command line, and the list as a whole, and marks what it cut.
 */

/** Characters of one process's command line (command and args together) that are kept. */
export const MAX_COMMAND_LINE_CHARS = 4096;
/**
 * Characters of args across one list. Commands are kept outside it (a row needs a name), but
 * once it is spent a process keeps only its command, cut to MAX_SPENT_COMMAND_CHARS.
 */
export const MAX_LISTED_COMMAND_LINE_CHARS = 256 * 1024;
const MAX_SPENT_COMMAND_CHARS = 256;
/**
 * The control protocol's bound on one word of argv (src/sandbox/control-channel.ts): init
 * sends a longer word cut to this, so a word of exactly this length counts as cut.
 */
const PROTOCOL_WORD_CHARS = 4096;
/** A working directory longer than Linux's PATH_MAX is no real one. */
const MAX_CWD_CHARS = 4096;

export interface BoundedCommandLine {
  command: string;
  args: string[];
  cwd: string;
  /** Set when command or args were cut to fit. */
  truncated?: true;
}

/** Keeps a running budget across the processes of one list. */
export class CommandLineBudget {
  #left = MAX_LISTED_COMMAND_LINE_CHARS;

  /** argv and cwd as init reported them (not trusted to be well-formed), cut to the bounds. */
  bound(argv: unknown, cwd: unknown): BoundedCommandLine {
    const words = Array.isArray(argv) ? argv : [];
    const texts = words.map((word) => (typeof word === "string" ? word : String(word)));
    let truncated = !Array.isArray(argv) || texts.some((text) => text.length >= PROTOCOL_WORD_CHARS);
    const [first = "", ...rest] = texts;
    const command = first.slice(0, this.#left > 0 ? MAX_COMMAND_LINE_CHARS : MAX_SPENT_COMMAND_CHARS);
    // The args share what is left of this process's cap with the command, and of the list's total.
    let room = Math.min(MAX_COMMAND_LINE_CHARS - command.length, this.#left);
    const args: string[] = [];
    for (const text of rest) {
      if (room <= 0) break;
      args.push(text.slice(0, room));
      room -= text.length;
    }
    const argChars = args.reduce((size, arg) => size + arg.length, 0);
    this.#left = Math.max(this.#left - argChars, 0);
    if (command.length < first.length || args.length < rest.length || argChars < rest.reduce((size, text) => size + text.length, 0)) truncated = true;
    const dir = typeof cwd === "string" ? cwd.slice(0, MAX_CWD_CHARS) : "";
    return { command, args, cwd: dir, ...(truncated ? { truncated: true as const } : {}) };
  }
}
