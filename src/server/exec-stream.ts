/**
 * The streamed form of the exec action: `POST /api/:definition/:key/actions/exec`
 * with `Accept: application/x-ndjson` answers with one JSON object per line as
 * the program prints, then its result:
 *
 *   {"type":"output","stream":"stdout","data":"<base64>"}   (any number)
 *   {"type":"result","value":{"pid":12,"exitCode":0}}        or
 *   {"type":"error","error":{"code":"EXEC_TIMEOUT","message":"…","details":{"pid":12,"exitCode":137}}}
 *
 * The output lines are the whole output, so the last line does not repeat it.
 * Failures before the program starts (bad arguments, ENOENT) are ordinary JSON
 * error responses, as for every action. A reader that falls more than
 * EXEC_STREAM_BUFFER_BYTES behind, or goes away, ends the program: an exec is
 * a call, not a background process (use spawn and connect() for that).
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import { AgentVmError } from "../errors.ts";
import type { ExecOptions } from "../vm.ts";
import { EXEC_STREAM_TYPE, type ExecStreamLine } from "../wire.ts";
import type { VmActor } from "./vm-actor.ts";

const EXEC_STREAM_BUFFER_BYTES = 8 * 1024 * 1024;
/** How long the last line may wait to be read before the connection is let go. */
const DRAIN_MS = 5_000;

export function wantsExecStream(request: IncomingMessage): boolean {
  return String(request.headers.accept ?? "").includes(EXEC_STREAM_TYPE);
}

export async function streamExec(actor: VmActor, args: unknown[], response: ServerResponse): Promise<void> {
  const [command, commandArgs, rawOptions] = args;
  if (rawOptions !== undefined && (rawOptions === null || typeof rawOptions !== "object" || Array.isArray(rawOptions))) {
    throw new AgentVmError("INVALID_ARGUMENT", `exec: options must be an object, got ${JSON.stringify(rawOptions)}`);
  }
  let started = false;
  let gone = false;
  response.once("close", () => (gone = true));
  const line = (value: ExecStreamLine) => response.write(`${JSON.stringify(value)}\n`);
  const forward = (stream: "stdout" | "stderr") => (data: Uint8Array) => {
    if (gone) throw new AgentVmError("ECONNRESET", "exec: the client closed the stream; the program was killed");
    if (response.writableLength > EXEC_STREAM_BUFFER_BYTES) {
      throw new AgentVmError("EVENTS_TOO_SLOW", `exec: the stream fell more than ${EXEC_STREAM_BUFFER_BYTES} bytes behind its reader; the program was killed — read output as it comes`);
    }
    if (!started) begin();
    line({ type: "output", stream, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("base64") });
  };
  const begin = () => {
    started = true;
    response.writeHead(200, { "content-type": EXEC_STREAM_TYPE, "cache-control": "no-store", "x-accel-buffering": "no" });
  };
  const options: ExecOptions = { ...(rawOptions as ExecOptions | undefined), onStdout: forward("stdout"), onStderr: forward("stderr") };
  let last: ExecStreamLine;
  try {
    const result = await actor.use((vm) => vm.exec(command as string, commandArgs as string[], options));
    last = { type: "result", value: { pid: result.pid, exitCode: result.exitCode } };
  } catch (error) {
    const shaped = AgentVmError.from(error);
    // Nothing was printed yet: the failure is an ordinary error response (ENOENT, INVALID_ARGUMENT, …).
    if (!started && shaped.code !== "EXEC_TIMEOUT" && shaped.code !== "EXEC_OUTPUT_LIMIT") throw shaped;
    const body = shaped.toJSON() as { details?: { pid?: number; exitCode?: number } };
    // details' stdout and stderr are what the output lines carried already.
    if (body.details) body.details = { ...(body.details.pid !== undefined ? { pid: body.details.pid } : {}), ...(body.details.exitCode !== undefined ? { exitCode: body.details.exitCode } : {}) };
    last = { type: "error", error: body };
  }
  if (gone) return;
  if (!started) begin();
  const socket = response.socket;
  response.end(`${JSON.stringify(last)}\n`);
  // A reader that never takes the rest would keep it buffered; one that did keeps its connection.
  setTimeout(() => {
    if (socket && socket.writableLength > 0) socket.destroy();
  }, DRAIN_MS).unref();
}
