/**
 * Guards the parent's reader of a Node IPC channel against a hostile child.
 *
 * Node's reader (lib/internal/child_process/serialization.js, called from
 * setupChannel's `channel.onread` in lib/internal/child_process.js) has two
 * holes for a parent that does not trust its child:
 *  - it buffers a message until it is whole, with no limit: with 'json'
 *    serialization the text since the last newline (channel[kJSONBuffer], a
 *    string), with 'advanced' the bytes of an unfinished length-prefixed
 *    message (channel[kMessageBufferSize]); one endless line grows the
 *    parent's memory until it dies;
 *  - a line that is not JSON (or bytes V8 cannot deserialize) throws out of
 *    `onread`, from native code: an uncaught exception that ends the parent.
 * Node has no option for either. This wraps the channel's `onread`: every
 * read is still parsed by Node, and handles still travel beside their
 * messages as before; a read that throws, or after which more than the cap is
 * buffered (one read adds at most 64 KiB), reports a violation instead, and
 * from then on what the child sends is dropped until the caller closes the
 * channel.
 *
 * It relies on Node internals (the pipe handle behind the `kChannelHandle`
 * symbol, the parser's buffer symbols); on a Node without them it returns
 * false and the caller says so (test/hostile-channel.test.ts checks it holds).
 */
import type { ChildProcess } from "node:child_process";

type Internals = Record<string | symbol, unknown>;

const symbolNamed = (object: object, name: string): symbol | undefined => Object.getOwnPropertySymbols(object).find((symbol) => symbol.description === name);

/**
 * Calls `onViolation` (once) when `child` sends what Node's reader cannot parse, or a message
 * longer than `maxSize` (bytes for 'advanced'; UTF-16 code units of the unfinished line for
 * 'json') before it ends. Returns false when this Node's IPC internals are not the ones known here.
 */
export function guardIpcReader(child: ChildProcess, maxSize: number, onViolation: (reason: string) => void): boolean {
  const handleSymbol = symbolNamed(child, "kChannelHandle");
  const handle = handleSymbol ? ((child as unknown as Internals)[handleSymbol] as Internals | undefined) : undefined;
  if (!handle || typeof handle.onread !== "function") return false;
  const json = symbolNamed(handle, "kJSONBuffer");
  const size = symbolNamed(handle, "kMessageBufferSize");
  const chunks = symbolNamed(handle, "kMessageBuffer");
  if (json === undefined && (size === undefined || chunks === undefined)) return false;
  const buffered = (): number => (json !== undefined ? (handle[json] as string).length : (handle[size!] as number));
  const forget = (): void => {
    // Node's disconnect() waits for a message being read to complete before it closes the channel:
    // this one never will.
    handle.buffering = false;
    if (json !== undefined) handle[json] = "";
    else {
      handle[chunks!] = [];
      handle[size!] = 0;
    }
    // A socket that came with the dropped data is closed, not left open in the server.
    const pending = handle.pendingHandle as { close?(): void } | null | undefined;
    handle.pendingHandle = null;
    pending?.close?.();
  };
  const read = handle.onread as (this: unknown, data?: unknown) => unknown;
  let failed = false;
  const fail = (reason: string): void => {
    failed = true;
    forget();
    onViolation(reason);
  };
  handle.onread = function (this: unknown, data?: unknown) {
    // No data is the end of the channel: Node's own clean-up runs whatever happened before.
    if (data === undefined || data === null) return read.call(this, data);
    if (failed) return void forget();
    try {
      read.call(this, data);
    } catch (error) {
      return fail(`a message Node's IPC reader cannot parse (${(error as Error).message.slice(0, 80)})`);
    }
    const waiting = buffered();
    if (waiting > maxSize) fail(`a message longer than ${maxSize} bytes (${waiting} buffered before its end)`);
  };
  return true;
}
